"""Fixture of the WebText tests: the generated site of `webtext_site`, served on 127.0.0.1."""

import pytest
from webtext_site import Site, SiteServer


@pytest.fixture
def site_server():
    server = SiteServer(Site())
    yield server
    server.close()
