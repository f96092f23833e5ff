"""``<bandwidth>`` (libvirt's virNetDevBandwidth): the element of a network and of a
guest's ``<interface>``, and domiftune's change of it, shared by every driver and by the
networks so that one parser and one set of rules says what a limit is.

Units are libvirt's: rates in kilobytes per second, bursts in kilobytes. ``inbound`` is
what goes towards the guest (or the network), ``outbound`` what comes from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, InvalidArgument, XMLError


@dataclass(frozen=True, slots=True)
class Rate:
    """One direction of a ``<bandwidth>``, in libvirt's units: ``average`` and ``peak``
    in kilobytes per second, ``burst`` in kilobytes (tc's ``kbps`` and ``kb``)."""

    average: int
    peak: int | None = None
    burst: int | None = None


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """``<bandwidth>``: ``inbound`` shapes what goes to the network (or guest),
    ``outbound`` polices what comes from it."""

    inbound: Rate | None = None
    outbound: Rate | None = None


RATE_MAX = 2**32 // 8 - 1  # tc's 32-bit rates, in bytes/s, over 1024: kilobytes/s


def parse_bandwidth(el: Element | None, where: str) -> Bandwidth | None:
    """A ``<bandwidth>`` element (libvirt's virNetDevBandwidthParse): each direction needs
    an ``average`` (``floor`` is not supported); numbers are positive integers."""
    if el is None:
        return None
    rates: dict[str, Rate | None] = {"inbound": None, "outbound": None}
    for child in el:
        if not isinstance(child.tag, str):
            continue
        if child.tag not in rates:
            raise XMLError(f"unexpected <{child.tag}> in <bandwidth> of {where}")
        if rates[child.tag] is not None:
            raise XMLError(f"only one <{child.tag}> is allowed in <bandwidth> of {where}")
        if child.get("floor") is not None:
            raise XMLError(f"<{child.tag} floor=...> in {where} is not supported by virtbus")
        values: dict[str, int | None] = {}
        for attr in ("average", "peak", "burst"):
            raw = child.get(attr)
            if raw is None:
                values[attr] = None
                continue
            if not raw.strip().isdigit() or not 0 < int(raw) <= RATE_MAX * 1024:
                raise XMLError(f"invalid <{child.tag} {attr}='{raw}'> in {where}:"
                               " expected a positive integer")  # fmt: skip
            values[attr] = int(raw)
        average = values["average"]
        if average is None:
            raise XMLError(f"missing mandatory average attribute of <{child.tag}> in {where}")
        if average > RATE_MAX or (values["peak"] or 0) > RATE_MAX:
            raise XMLError(f"<{child.tag}> rate in {where} is over {RATE_MAX} kilobytes/s")
        if values["peak"] is not None and values["peak"] < average:
            raise XMLError(f"<{child.tag} peak='{values['peak']}'> in {where} is below its"
                           f" average {average}")  # fmt: skip
        rates[child.tag] = Rate(average, values["peak"], values["burst"])
    return Bandwidth(rates["inbound"], rates["outbound"])


def bandwidth_element(bandwidth: Bandwidth) -> Element:
    """The ``<bandwidth>`` element of ``bandwidth`` (attributes only where set)."""
    root = etree.Element("bandwidth")
    for tag, rate in (("inbound", bandwidth.inbound), ("outbound", bandwidth.outbound)):
        if rate is None:
            continue
        child = etree.SubElement(root, tag, average=str(rate.average))
        if rate.peak is not None:
            child.set("peak", str(rate.peak))
        if rate.burst is not None:
            child.set("burst", str(rate.burst))
    return root


@dataclass(frozen=True, slots=True)
class RateChange:
    """One direction of a domiftune, as virsh sends it: 0 is "not given"; an ``average``
    of 0 alone removes that direction's limit."""

    average: int = 0
    peak: int = 0
    burst: int = 0
    floor: int = 0


def _changed(direction: str, change: RateChange, where: str) -> Rate | None:
    if change.floor:
        raise ConfigUnsupported(f"{direction} floor of {where} is not supported by virtbus"
                                " (no QoS guarantees on its networks)")  # fmt: skip
    if change.average == 0:
        if change.peak or change.burst:
            raise InvalidArgument(f"{direction} average of {where} is mandatory with a"
                                  " peak or a burst (0 alone removes the limit)")  # fmt: skip
        return None
    if change.average > RATE_MAX or change.peak > RATE_MAX or change.burst > RATE_MAX * 1024:
        raise InvalidArgument(f"{direction} rate of {where} is over {RATE_MAX} kilobytes/s")
    if change.peak and change.peak < change.average:
        raise InvalidArgument(f"{direction} peak {change.peak} of {where} is below its"
                              f" average {change.average}")  # fmt: skip
    return Rate(change.average, change.peak or None, change.burst or None)


def tuned(old: Bandwidth | None, inbound: RateChange | None, outbound: RateChange | None,
          where: str) -> Bandwidth | None:  # fmt: skip
    """``old`` after a domiftune (libvirt's qemuDomainSetInterfaceParameters): a direction
    given replaces that direction whole (peak and burst not given are gone), one not given
    is kept; None when no limit is left. INVALID_ARG / CONFIG_UNSUPPORTED before anything
    changes."""
    keep = old or Bandwidth()
    new_in = keep.inbound if inbound is None else _changed("inbound", inbound, where)
    new_out = keep.outbound if outbound is None else _changed("outbound", outbound, where)
    if new_in is None and new_out is None:
        return None
    return Bandwidth(new_in, new_out)
