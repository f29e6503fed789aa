"""Schemathesis against the model server's own /openapi.json: generated requests (valid and not)
never get a 5xx, and every answer conforms to the document (status, content type, schema, headers)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from model.server import openapi_document, running_server
from tests.helpers import config_for
from tests.model.serving_fakes import ListRecommender, call

schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    # No static document can say "at most FRESHREC_MAX_FUTURE_S ahead of the clock" (tested in
    # test_server.py); with a bound past the contract's largest ts, the document is exact.
    config = config_for(tmp_path_factory.mktemp("openapi"), max_future_s=4102444800)
    with running_server(ListRecommender(), config) as s:
        yield s.url


def test_the_served_document_is_the_one_tested(base_url):
    assert call(base_url, "GET", "/openapi.json")[2] == openapi_document()


@schema.parametrize()
@settings(max_examples=50, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, base_url):
    case.call_and_validate(base_url=base_url)
