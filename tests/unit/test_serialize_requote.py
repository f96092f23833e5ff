"""dumpxml's single quotes: the one-replace fast path writes exactly what the token-by-token
rewrite writes, and falls back to it whenever a ``"`` or ``'`` could be text."""

from __future__ import annotations

import copy

import pytest
from lxml import etree

from virtbus.domain.serialize import _requote, _single_quote_attrs, dumps

CASES = [
    "<domain type='kvm'><name>a</name><devices><disk type='file'/></devices></domain>",
    '<domain type="kvm"><description>say "hi"</description></domain>',
    "<domain type='kvm'><description>it&apos;s</description></domain>",
    "<domain type='kvm'><title a='x&quot;y'>t</title></domain>",
    '<domain type=\'kvm\'><name>n</name>tail "quoted"<!-- c="1" --></domain>',
    "<domain type='kvm'><metadata><m:x xmlns:m='urn:m' a='1'/></metadata></domain>",
    "<domain type='kvm'><name><![CDATA[a=\"b\"]]></name></domain>",
]


@pytest.mark.parametrize("text", CASES)
def test_fast_path_matches_the_token_rewrite(text: str) -> None:
    tree = copy.deepcopy(etree.fromstring(text))
    etree.indent(tree, space="  ")
    xml = str(etree.tostring(tree, encoding="unicode"))
    assert _requote(tree, xml) == _single_quote_attrs(xml)


def test_dumps_writes_single_quotes_and_keeps_text_quotes() -> None:
    out = dumps(etree.fromstring('<domain type="kvm"><description>a "b"</description></domain>'))
    assert out == "<domain type='kvm'>\n  <description>a \"b\"</description>\n</domain>\n"
    plain = dumps(etree.fromstring('<domain type="kvm"><name id="1">x</name></domain>'))
    assert plain == "<domain type='kvm'>\n  <name id='1'>x</name>\n</domain>\n"
