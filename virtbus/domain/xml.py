"""Safe parsing of libvirt domain XML: bounded size, no DTD, no entities, no network.

Entry points: :func:`parse_domain_xml`, and :func:`parse_untrusted_root` for the other
libvirt documents (storage pools and volumes). A document with a DOCTYPE (and so any entity
declaration: billion laughs, XXE) is refused outright, before and after parsing.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from virtbus.domain.definition import OWNER_NS, OWNER_TAG, DomainDefinition
from virtbus.domain.names import check_domain_name
from virtbus.errors import XMLError


@dataclass(frozen=True, slots=True)
class XMLLimits:
    """Bounds on untrusted domain XML (a typed setting)."""

    max_bytes: int = 1 << 20  # size of the document, UTF-8 encoded when given as str


def _parser(encoding: str | None) -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_comments=False,
        encoding=encoding,
    )


def _reject_dtd(data: bytes) -> None:
    # Cheap pre-check on the common (ASCII-compatible) encodings; the docinfo check
    # after parsing catches the rest (e.g. UTF-16 input).
    upper = data.upper()
    if b"<!DOCTYPE" in upper or b"<!ENTITY" in upper:
        raise XMLError("DOCTYPE and entity declarations are not allowed")


def parse_untrusted_root(
    xml: str | bytes, what: str, *, limits: XMLLimits = XMLLimits()
) -> etree._Element:
    """The root element of an untrusted document (domain, pool, volume ...), parsed safely.

    ``what`` names the kind of document in error messages (``"domain"`` -> "domain XML").
    """
    if isinstance(xml, str):
        data, encoding = xml.encode("utf-8"), "utf-8"  # overrides any declared encoding
    elif isinstance(xml, bytes | bytearray | memoryview):
        data, encoding = bytes(xml), None
    else:
        raise XMLError(f"{what} XML must be str or bytes, not {type(xml).__name__}")
    if len(data) > limits.max_bytes:
        raise XMLError(
            f"{what} XML is {len(data)} bytes, over the limit of {limits.max_bytes} bytes"
        )
    if not data.strip():
        raise XMLError(f"{what} XML is empty")
    try:
        _reject_dtd(data)
    except XMLError as exc:
        raise XMLError(f"{exc.message} in {what} XML") from None
    try:
        root = etree.fromstring(data, _parser(encoding))
    except etree.XMLSyntaxError as exc:
        raise XMLError(f"malformed {what} XML: {exc}") from None
    except ValueError as exc:  # e.g. an unknown encoding
        raise XMLError(f"unreadable {what} XML: {exc}") from None
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise XMLError(f"DOCTYPE and entity declarations are not allowed in {what} XML")
    if any(isinstance(node, etree._Entity) for node in root.iter()):
        raise XMLError(f"entity references are not allowed in {what} XML")
    return root


def domain_name_of(xml: str | bytes, *, limits: XMLLimits = XMLLimits()) -> str:
    """The ``<name>`` of a domain document, parsed as safely as :func:`parse_domain_xml`
    but without building its views: what the agent needs to serialise a define on the
    domain's name (the driver's full parse follows; for a 100-disk domain the views were
    most of a second parse on every define)."""
    root = parse_untrusted_root(xml, "domain", limits=limits)
    name_el = root.find("name")
    if name_el is None:
        raise XMLError("missing <name>")
    name = name_el.text or ""
    check_domain_name(name)
    return name


def parse_domain_xml(xml: str | bytes, *, limits: XMLLimits = XMLLimits()) -> DomainDefinition:
    """Parse and validate a ``<domain>`` document; XMLError naming what is wrong."""
    return DomainDefinition(parse_untrusted_root(xml, "domain", limits=limits))


SECRET_ATTRIBUTES = (("./devices/graphics", "passwd"),)  # libvirt's VIR_DOMAIN_XML_SECURE


def may_hold_secrets(xml: str) -> bool:
    """False when ``xml`` surely has none of the secrets (no parse needed to hide them)."""
    return any(attribute in xml for _, attribute in SECRET_ATTRIBUTES)


def hide_secrets(domain: etree._Element) -> bool:
    """Take the secrets (:data:`SECRET_ATTRIBUTES`) out of a ``<domain>`` element, in
    place; True if there were any. The one place that knows what a secret is: dumpxml
    and every document that embeds a domain (a snapshot's) hide through it."""
    hidden = False
    for path, attribute in SECRET_ATTRIBUTES:
        for el in domain.findall(path):
            if attribute in el.attrib:
                del el.attrib[attribute]
                hidden = True
    return hidden


def without_secrets(xml: str) -> str:
    """``xml`` as dumpxml shows it without ``--security-info``: the graphics passwords
    (``<graphics passwd=...>``) left out, as libvirt leaves them out unless asked for
    VIR_DOMAIN_XML_SECURE (and the caller may read secrets)."""
    if not may_hold_secrets(xml):  # the common case: nothing to hide, no second parse
        return xml
    defn = parse_domain_xml(xml)
    return defn.to_xml() if hide_secrets(defn.root) else xml


def owner_of(xml: str) -> str | None:
    """The domain's owner (the bus user that defined it) from its virtbus metadata."""
    if OWNER_NS not in xml:  # the common fast path: no second parse
        return None
    return parse_domain_xml(xml).owner


def with_owner(xml: str, owner: str) -> str:
    """``xml`` with ``owner`` as its only virtbus owner (any owner the caller wrote is
    replaced: the agent, not the definition, says who defined it)."""
    defn = parse_domain_xml(xml)
    root = defn.root
    generated = root.find("uuid")
    if generated is not None and "uuid" not in xml:  # the parse made one up: the driver
        root.remove(generated)  # picks the uuid (a redefine by name keeps the old one)
    meta = root.find("metadata")
    if meta is None:
        meta = etree.SubElement(root, "metadata")
        name = root.find("name")  # libvirt's place for it: after name/uuid/title
        anchor = root.find("uuid") if root.find("uuid") is not None else name
        if anchor is not None:
            anchor.addnext(meta)
    for old in meta.findall(OWNER_TAG):
        meta.remove(old)
    el = etree.SubElement(meta, OWNER_TAG, nsmap={"virtbus": OWNER_NS})
    el.text = owner
    return defn.to_xml()
