"""Smoke tests for the test support code itself: servers start, S3 semantics the product relies on."""

from __future__ import annotations

import re

import pytest
from botocore.exceptions import ClientError

from tests.conftest import ClusterFactory
from tests.support.s3 import MotoServer


def test_cluster_lifecycle(cluster_factory: ClusterFactory, pg_version: str) -> None:
    pg = cluster_factory().initdb()
    pg.start()
    assert pg.is_running()
    assert pg.sql("select 1") == [(1,)]
    assert str(pg.scalar("show server_version_num")).startswith(pg_version)
    assert pg.scalar("show data_checksums") == "on"
    pg.sql("create table t as select g as id, 'row ' || g as v from generate_series(1, 100) g")
    assert pg.table_md5("t").startswith("100:")
    assert re.fullmatch(r"[0-9A-F]{24}", pg.switch_wal())
    pg.stop()
    assert not pg.is_running()


def test_conditional_put(moto_server: MotoServer, s3_bucket: str) -> None:
    """pitr relies on If-None-Match: '*' to never overwrite an archived object."""
    s3 = moto_server.client()
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket=s3_bucket, Key="k", Body=b"second", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"first"


def test_outage_keeps_objects(moto_server: MotoServer, s3_bucket: str) -> None:
    s3 = moto_server.client()
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"kept")
    moto_server.outage()
    with pytest.raises(Exception):  # noqa: B017 - connection refused, whatever botocore wraps it as
        moto_server.client(retries={"max_attempts": 1}).get_object(Bucket=s3_bucket, Key="k")
    moto_server.recover()
    assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"kept"
