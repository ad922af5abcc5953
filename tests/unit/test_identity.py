"""The job key: one per (tenant, client ID), never shared by two pairs, and the client's ID recoverable."""

from __future__ import annotations

import itertools

from inferlog.identity import MAX_JOB_KEY_LEN, client_id_of, job_key

TENANTS = [None, "acme", "a", "acme.eu", "#acme", "a/b", "a b", "x" * 64, "x" * 65, "ünï", "", "/", "acme/",
           "acme\n", "acme\n/x"]
IDS = ["x", "1", "a/b", "/x", "acme", "acme/x", "#1", "b/x", "x" * 128, "ünï", "a//b"]


def test_every_tenant_and_id_pair_has_its_own_key() -> None:
    pairs = list(itertools.product(TENANTS, IDS))
    keys = [job_key(tenant, client_id) for tenant, client_id in pairs]
    assert len(set(keys)) == len(pairs), "two (tenant, id) pairs share a job key"


def test_the_default_tenant_keeps_its_ids_and_the_client_id_comes_back() -> None:
    assert job_key(None, "req-1") == "req-1"
    assert job_key("acme", "req-1") == "acme/req-1"
    assert job_key("a b", "req-1").startswith("#") and job_key("a b", "req-1").endswith("/req-1")
    for tenant, client_id in itertools.product(TENANTS, IDS):
        assert client_id_of(job_key(tenant, client_id)) == client_id


def test_keys_are_bounded_whatever_the_tenant_name() -> None:
    assert len(job_key("t" * 10_000, "x" * 128)) <= MAX_JOB_KEY_LEN
    assert len(job_key("t" * 64, "x" * 128)) <= MAX_JOB_KEY_LEN
