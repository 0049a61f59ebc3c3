"""/docs and /redoc work without a network: their scripts and styles come from this server."""
import re

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from orchestrator.settings import Settings


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(Settings(home=tmp_path / "home", api_keys=["k"]))) as c:
        yield c


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_this_server(client, page):
    resp = client.get(page)
    assert resp.status_code == 200 and "text/html" in resp.headers["content-type"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', resp.text) + re.findall(r"url: '([^']+)'", resp.text)
    scripts = re.findall(r'<script src="([^"]+)"', resp.text)
    assert scripts, resp.text
    for url in assets:
        assert not url.startswith(("http://", "https://", "//")), f"{page} loads {url} from elsewhere"
    for url in scripts:
        js = client.get(url)
        assert js.status_code == 200, url
        assert "javascript" in js.headers["content-type"]
        assert len(js.content) > 100_000  # the real bundle, not a stub
    assert "fonts.googleapis" not in resp.text
    # the page points at this app's schema, which answers
    assert client.get("/openapi.json").status_code == 200
