"""Instrument metadata from SEM image files: vendor/model, pixel size, magnification, beam voltage, working distance.

Readers (all best effort; a value that is absent or cannot be parsed is ``None``, never an exception):

* Zeiss SmartSEM: TIFF tag 34118 (``CZ_SEM``), ``AP_*``/``DP_*``/``SV_*`` keys each followed by a
  ``Label = value unit`` line.
* FEI / Thermo Fisher: TIFF tags 34682 (``FEI_HELIOS``) and 34680 (``FEI_SFEG``), INI-style text with SI units
  (``[Scan] PixelWidth=`` in metres, ``[EBeam] HV=`` in volts, ``WD=`` in metres); the older FEI/Philips XL
  ``[DatabarData]`` variant (``flAccV`` in volts, ``flWD`` in millimetres).
* JEOL (``$CM_MAG``, ``$CM_ACCEL_VOLT``, ``$SM_WD``, ``$$SM_MICRON_BAR``/``$$SM_MICRON_MARKER``) and Hitachi
  (``Magnification=``, ``AcceleratingVoltage=``, ``PixelSize=``, ``WorkingDistance=``) sidecar-style text when it
  is embedded in ImageDescription (tag 270) or in a JPEG/PNG comment/text chunk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from PIL import Image

METADATA_KEYS: tuple[str, ...] = ("instrument", "pixel_size_nm", "magnification", "hv_kv", "wd_mm")

TAG_IMAGE_DESCRIPTION = 270
TAG_MAKE = 271
TAG_MODEL = 272
TAG_ZEISS = 34118
TAG_FEI_SFEG = 34680
TAG_FEI_HELIOS = 34682

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_VALUE_RE = re.compile(rf"^\s*({_NUMBER})\s*(\S*)")
_LENGTH_TO_NM = {
    "pm": 1e-3,
    "nm": 1.0,
    "um": 1e3,
    "µm": 1e3,
    "μm": 1e3,
    "micron": 1e3,
    "microns": 1e3,
    "mm": 1e6,
    "cm": 1e7,
    "m": 1e9,
}
_VOLTAGE_TO_KV = {"v": 1e-3, "volt": 1e-3, "volts": 1e-3, "kv": 1.0, "mv": 1e3}


def empty_metadata() -> dict[str, Any]:
    return dict.fromkeys(METADATA_KEYS)


# --------------------------------------------------------------------------------------------------- value parsing


def _float(text: Any) -> float | None:
    """A finite float from a number or numeric string; None for anything else ('notafloat', '', nan)."""
    if text is None:
        return None
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _VALUE_RE.match(str(text))
        if not match:
            return None
        try:
            value = float(match.group(1))
        except ValueError:
            return None
    return value if math.isfinite(value) else None


def _normalise_unit(unit: str) -> str:
    """'µm' however it was encoded: UTF-8 read as Latin-1 ('Âµm'), Greek mu, or '?' from an ASCII-only writer."""
    unit = unit.strip(".,;:()[]")
    for micro in ("Âµ", "Î¼", "μ"):
        unit = unit.replace(micro, "µ")
    if len(unit) == 2 and unit[0] == "?":
        unit = "µ" + unit[1]
    return unit


def _split_unit(text: str) -> tuple[float | None, str]:
    match = _VALUE_RE.match(text)
    if not match:
        return None, ""
    try:
        value = float(match.group(1))
    except ValueError:
        return None, ""
    return (value if math.isfinite(value) else None), _normalise_unit(match.group(2))


def _length_nm(text: str, default_unit: str) -> float | None:
    value, unit = _split_unit(text)
    if value is None:
        return None
    factor = _LENGTH_TO_NM.get(unit or default_unit) or _LENGTH_TO_NM.get((unit or default_unit).lower())
    return None if factor is None else value * factor


def _voltage_kv(text: str, default_unit: str) -> float | None:
    value, unit = _split_unit(text)
    if value is None:
        return None
    factor = _VOLTAGE_TO_KV.get((unit or default_unit).lower())
    return None if factor is None else value * factor


def _magnification(text: str) -> float | None:
    """'50.00 K X' → 50000, '105 X' → 105, '4.53 KX' → 4530, '12000x' → 12000."""
    match = re.match(rf"^\s*({_NUMBER})\s*([kKmM]?)\s*[xX×]?\s*$", text.strip())
    if not match:
        return _float(text)
    value = float(match.group(1))
    prefix = match.group(2).lower()
    return value * {"": 1.0, "k": 1e3, "m": 1e6}[prefix]


def _positive(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _text_of(value: Any) -> str | None:
    """Tag values arrive as str, bytes or tuples of either."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, tuple | list):
        parts = [_text_of(v) for v in value]
        return "".join(p for p in parts if p) or None
    return None


# --------------------------------------------------------------------------------------------------- Zeiss


def parse_zeiss(text: str, image_width: int | None = None) -> dict[str, Any]:
    """Zeiss SmartSEM CZ_SEM text (tag 34118).

    The pixel size is the field width (``AP_WIDTH``) over the stored image width when both are known: SmartSEM's
    ``AP_PIXEL_SIZE`` refers to the scan store resolution, which differs from the file's when it was saved
    resampled (e.g. a 1024-pixel scan saved at 512 or 2048 pixels). Otherwise ``AP_IMAGE_PIXEL_SIZE``, then
    ``AP_PIXEL_SIZE``.
    """
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    entries: dict[str, str] = {}
    for i, line in enumerate(lines[:-1]):
        if re.fullmatch(r"[A-Za-z]{2}_[A-Za-z0-9_]+", line):
            nxt = lines[i + 1]
            sep = re.search(r"[=:]", nxt)
            if sep:
                entries.setdefault(line.upper(), nxt[sep.end() :].strip())
    out = empty_metadata()
    field_nm = _length_nm(entries.get("AP_WIDTH", ""), "um")
    if field_nm and image_width:
        out["pixel_size_nm"] = field_nm / image_width
    else:
        for key in ("AP_IMAGE_PIXEL_SIZE", "AP_PIXEL_SIZE"):
            if key in entries:
                out["pixel_size_nm"] = _length_nm(entries[key], "nm")
                break
    if "AP_MAG" in entries:
        out["magnification"] = _magnification(entries["AP_MAG"])
    for key in ("AP_ACTUALKV", "AP_MANUALKV"):
        if key in entries and (kv := _positive(_voltage_kv(entries[key], "kV"))) is not None:
            out["hv_kv"] = kv
            break
    if "AP_WD" in entries:
        wd_nm = _length_nm(entries["AP_WD"], "mm")
        out["wd_mm"] = None if wd_nm is None else wd_nm / 1e6
    model = entries.get("DP_SEM") or ""
    if not model and entries.get("SV_SERIAL_NUMBER"):
        model = re.sub(r"(-\d+)+$", "", entries["SV_SERIAL_NUMBER"]).strip()
    out["instrument"] = f"Zeiss {model}".strip()
    return out


# --------------------------------------------------------------------------------------------------- FEI / Thermo


def parse_ini(text: str) -> dict[str, dict[str, str]]:
    """Lenient INI parser (FEI writes duplicate keys, blank values and stray quotes)."""
    sections: dict[str, dict[str, str]] = {}
    current = sections.setdefault("", {})
    for raw in text.replace("\r", "\n").split("\n"):
        line = raw.strip().strip("\x00")
        if not line or line.startswith((";", "#")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].strip(), {})
            continue
        if "=" in line:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), value.strip())
    return sections


def _get(sections: Mapping[str, Mapping[str, str]], candidates: Iterable[tuple[str, str]]) -> str | None:
    for section, key in candidates:
        value = sections.get(section, {}).get(key)
        if value not in (None, ""):
            return value
    return None


def parse_fei(text: str) -> dict[str, Any]:
    """FEI / Thermo Fisher INI-style text (tags 34682, 34680), SI units."""
    ini = parse_ini(text)
    out = empty_metadata()
    if "DatabarData" in ini and "Scan" not in ini:
        return _parse_fei_xl(ini)
    beam = ini.get("Beam", {}).get("Beam") or "EBeam"
    scan = ini.get("Beam", {}).get("Scan") or "EScan"
    width_m = _float(_get(ini, [("Scan", "PixelWidth"), (scan, "PixelWidth"), ("EScan", "PixelWidth")]))
    out["pixel_size_nm"] = None if width_m is None else width_m * 1e9
    hv_v = _float(_get(ini, [("Beam", "HV"), (beam, "HV"), ("EBeam", "HV")]))
    out["hv_kv"] = None if hv_v is None else hv_v / 1e3
    wd_m = _float(_get(ini, [(beam, "WD"), ("EBeam", "WD"), ("Stage", "WorkingDistance")]))
    out["wd_mm"] = None if wd_m is None else wd_m * 1e3
    hfw = _float(_get(ini, [(beam, "HFW"), ("EBeam", "HFW"), ("Scan", "HorFieldsize")]))
    canvas = _float(_get(ini, [("Image", "MagCanvasRealWidth")]))
    if hfw and canvas and hfw > 0:
        out["magnification"] = canvas / hfw  # what xT prints in the data bar
    system = (_get(ini, [("System", "SystemType"), ("System", "Type")]) or "").replace('"', "").strip()
    system = re.sub(r"\s+", " ", system)
    out["instrument"] = system if system.upper().startswith(("FEI", "THERMO")) else f"FEI {system}".strip()
    return out


def _parse_fei_xl(ini: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """Older FEI/Philips XL-series ``[DatabarData]`` block (tag 34680)."""
    out = empty_metadata()
    bar = ini.get("DatabarData", {})
    hv_v = _float(bar.get("flAccV")) or _float(ini.get("Vector", {}).get("HighTension"))
    out["hv_kv"] = None if hv_v is None else hv_v / 1e3
    out["wd_mm"] = _float(bar.get("flWD")) or _float(ini.get("Vector", {}).get("FWD"))
    out["magnification"] = _float(ini.get("Vector", {}).get("Magnification"))
    out["instrument"] = "FEI/Philips XL"
    return out


# --------------------------------------------------------------------------------------------------- JEOL / Hitachi


def parse_sidecar_text(text: str) -> dict[str, Any]:
    """JEOL ``$KEY value`` and Hitachi ``Key=value`` text (as in their .txt sidecars), plus generic keys."""
    out = empty_metadata()
    jeol: dict[str, str] = {}
    kv: dict[str, str] = {}
    for raw in text.replace("\r", "\n").split("\n"):
        line = raw.strip().strip("\x00")
        if line.startswith("$"):
            key, _, value = line.lstrip("$").partition(" ")
            jeol.setdefault(key.strip().upper(), value.strip())
        elif "=" in line:
            key, _, value = line.partition("=")
            kv.setdefault(key.strip().lower().replace(" ", ""), value.strip())
    if jeol:
        out["magnification"] = _magnification(jeol["CM_MAG"]) if "CM_MAG" in jeol else None
        for key in ("CM_ACCEL_VOLT", "CM_ACCEL_VOLTAGE"):
            if key in jeol:
                value = _float(jeol[key])
                # JEOL writes kV; a value above 500 can only be volts.
                out["hv_kv"] = None if value is None else (value / 1e3 if value > 500 else value)
                break
        if "SM_WD" in jeol:
            out["wd_mm"] = _float(jeol["SM_WD"])
        bar_px = _float(jeol.get("SM_MICRON_BAR"))
        marker_nm = _length_nm(jeol.get("SM_MICRON_MARKER", ""), "um")
        if bar_px and marker_nm:
            out["pixel_size_nm"] = marker_nm / bar_px
        if jeol.get("CM_INSTRUMENT") or jeol.get("CM_LABEL"):
            model = jeol.get("CM_INSTRUMENT", "")
            out["instrument"] = f"JEOL {model}".strip()
    if kv:
        if out["pixel_size_nm"] is None and "pixelsize" in kv:
            out["pixel_size_nm"] = _length_nm(kv["pixelsize"], "nm")
        if out["magnification"] is None and "magnification" in kv:
            out["magnification"] = _magnification(kv["magnification"])
        if out["hv_kv"] is None:
            for key in ("acceleratingvoltage", "acceleratingvoltage(v)", "hv"):
                if key in kv:
                    value, unit = _split_unit(kv[key])
                    if value is not None:
                        unit_kv = _VOLTAGE_TO_KV.get(unit.lower()) if unit else None
                        out["hv_kv"] = value * unit_kv if unit_kv else (value / 1e3 if value > 500 else value)
                    break
        if out["wd_mm"] is None and "workingdistance" in kv:
            value, unit = _split_unit(kv["workingdistance"])
            if value is not None:
                factor = _LENGTH_TO_NM.get(unit) if unit else None
                # Hitachi writes micrometres ("8100 um"); bare numbers above 100 are micrometres too.
                out["wd_mm"] = value * factor / 1e6 if factor else (value / 1e3 if value > 100 else value)
        model = kv.get("instructname") or kv.get("instrumentname")
        if model and out["instrument"] is None:
            out["instrument"] = f"Hitachi {model}" if "[semimagefile]" in text.lower() else model
        elif out["instrument"] is None and "[semimagefile]" in text.lower():
            out["instrument"] = "Hitachi"
    return out


# --------------------------------------------------------------------------------------------------- entry point


def _clean(meta: Mapping[str, Any]) -> dict[str, Any]:
    out = empty_metadata()
    for key in ("pixel_size_nm", "magnification", "hv_kv", "wd_mm"):
        value = meta.get(key)
        out[key] = _positive(float(value)) if isinstance(value, int | float) else None
    instrument = meta.get("instrument")
    out["instrument"] = instrument.strip() if isinstance(instrument, str) and instrument.strip() else None
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key in METADATA_KEYS:
        if base.get(key) is None and extra.get(key) is not None:
            base[key] = extra[key]
    return base


def read_sem_metadata(img: Image.Image) -> dict[str, Any]:
    """Instrument metadata of an opened PIL image: keys ``instrument`` (str or None) and ``pixel_size_nm``,
    ``magnification``, ``hv_kv``, ``wd_mm`` (positive floats or None). Never raises on bad content."""
    result = empty_metadata()
    try:
        tags: Mapping[int, Any] = getattr(img, "tag_v2", None) or {}
        width = int(img.size[0]) if getattr(img, "size", None) else None
        readers: tuple[tuple[int, Callable[[str], dict[str, Any]]], ...] = (
            (TAG_ZEISS, lambda text: parse_zeiss(text, width)),
            (TAG_FEI_HELIOS, parse_fei),
            (TAG_FEI_SFEG, parse_fei),
        )
        for tag, parser in readers:
            text = _text_of(tags.get(tag)) if tag in tags else None
            if text:
                try:
                    _merge(result, _clean(parser(text)))
                except Exception:
                    continue
        texts = [_text_of(tags.get(TAG_IMAGE_DESCRIPTION)) if TAG_IMAGE_DESCRIPTION in tags else None]
        info = getattr(img, "info", {}) or {}
        texts += [_text_of(info.get(k)) for k in ("comment", "description", "Description", "Comment")]
        for text in texts:
            if text and ("$CM_" in text or "=" in text):
                try:
                    _merge(result, _clean(parse_sidecar_text(text)))
                except Exception:
                    continue
        if result["instrument"] is None:
            make = _text_of(tags.get(TAG_MAKE)) if TAG_MAKE in tags else None
            model = _text_of(tags.get(TAG_MODEL)) if TAG_MODEL in tags else None
            name = " ".join(p.strip("\x00 ") for p in (make, model) if p and p.strip("\x00 "))
            result["instrument"] = name or None
    except Exception:
        return _clean(result)
    return _clean(result)
