"""Serialize a domain tree the way libvirt's ``dumpxml`` writes it.

Two-space indentation, no XML declaration, attributes in single quotes (libvirt's
``virBuffer`` style) except inside ``<metadata>``, which libvirt copies verbatim and
libxml2 writes with double quotes.
"""

from __future__ import annotations

import copy
import re

from lxml import etree

# markup tokens of serialized XML; only start tags (last branch) have attributes to requote
_TOKENS = re.compile(r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<[^!?][^>]*>", re.DOTALL)
_ATTR_VALUE = re.compile(r'="([^"]*)"')


def _single_quote_attrs(xml: str) -> str:
    """Requote attributes with ``'`` as libvirt writes them (values are already escaped).

    ``<metadata>`` content keeps lxml's double quotes, as libvirt copies it verbatim.
    """
    out: list[str] = []
    pos = depth = 0
    meta_depth: int | None = None  # depth of <metadata> while inside it
    for match in _TOKENS.finditer(xml):
        token = match.group(0)
        out.append(xml[pos : match.start()])
        pos = match.end()
        if token.startswith(("<!--", "<![CDATA[", "<?")):
            out.append(token)
            continue
        if token.startswith("</"):
            depth -= 1
            if meta_depth is not None and depth == meta_depth:
                meta_depth = None
            out.append(token)
            continue
        if meta_depth is None and depth == 1 and re.match(r"<metadata[\s/>]", token):
            meta_depth = depth
        if meta_depth is None or depth == meta_depth:
            token = _ATTR_VALUE.sub(lambda a: "='" + a.group(1).replace("'", "&apos;") + "'", token)
        if not token.endswith("/>"):
            depth += 1
        elif meta_depth == depth:
            meta_depth = None
        out.append(token)
    out.append(xml[pos:])
    return "".join(out)


_SLOW_MARKERS = ("<!--", "<![CDATA[", "<?", "<metadata")


def _requote(tree: etree._Element, xml: str) -> str:
    """:func:`_single_quote_attrs`, in one C-level replace when that is the same thing.

    lxml writes an attribute value's ``"`` as ``&quot;``, so when no text or tail holds a
    ``"``, no ``'`` appears anywhere, and there is no comment, CDATA, processing
    instruction or ``<metadata>``, every ``"`` in ``xml`` delimits an attribute value and
    swapping them all is exactly the token-by-token rewrite (define of a 100-disk domain
    spent most of its serialisation there).
    """
    if "'" in xml or any(marker in xml for marker in _SLOW_MARKERS):
        return _single_quote_attrs(xml)
    for el in tree.iter():
        if (el.text is not None and '"' in el.text) or (el.tail is not None and '"' in el.tail):
            return _single_quote_attrs(xml)
    return xml.replace('"', "'")


def dumps(root: etree._Element) -> str:
    """Pretty, stable text of ``root`` (the tree itself is not modified)."""
    tree = copy.deepcopy(root)
    etree.indent(tree, space="  ")
    return _requote(tree, str(etree.tostring(tree, encoding="unicode"))) + "\n"
