"""Heat-map overlays of anomaly maps, with numpy and Pillow only (no OpenCV, no matplotlib).

The official AnomalyCLIP visualisation does::

    norm = (amap - amap.min()) / (amap.max() - amap.min())
    heat = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * norm), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)

:func:`apply_colormap` reproduces that bit for bit (same quantization by truncation, same 256-entry
jet table as OpenCV), :func:`overlay` blends the heat map onto the image at the image's original
size and can outline a ground-truth or predicted mask, and :func:`save_overlay` writes the result
as a PNG atomically.

Colormap sources (each a 256 x 3 ``uint8`` RGB table, entry ``i`` for ``np.uint8(255 * x) == i``):

* ``"jet"``: OpenCV's ``COLORMAP_JET`` (``modules/imgproc/src/colormap.cpp``, class ``Jet``).
  OpenCV stores 256 float control points per channel at ``X = linspace(0, 1, 256)``; they are
  GNU Octave's jet, ``clip(min(4x - c, 3 + c - 4x), 0, 1)`` with ``c = 1.5`` (red), ``0.5``
  (green), ``-0.5`` (blue). It re-samples them with its float32 ``interp1`` at the same 256
  points and converts with ``convertTo(CV_8U, 255)`` (round half to even). Every interior value
  times 255 is an exact ``k + 0.5`` tie, so the float32 rounding of the interpolation decides
  the last bit; :func:`_opencv_jet_table` repeats those float32 steps and matches all 256
  entries of ``cv2.applyColorMap`` (checked against OpenCV 4.14).
* ``"inferno"``: matplotlib's inferno (Nathaniel J. Smith and Stefan van der Walt, CC0; the
  256 float entries of ``_inferno_data``), rounded to ``uint8``. Identical to OpenCV's
  ``COLORMAP_INFERNO``.
* ``"turbo"``: Google's Turbo (Anton Mikhailov, 2019, Apache-2.0; the 256-entry sRGB table
  ``turbo_srgb_floats``, also matplotlib's ``_turbo_data``), rounded to ``uint8``. Identical to
  OpenCV's ``COLORMAP_TURBO``.
* ``"gray"``: ``(i, i, i)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from .errors import InvalidInputError
from .preprocessing import load_image
from .files import atomic_write

__all__ = [
    "COLORMAPS",
    "colormap_table",
    "apply_colormap",
    "overlay",
    "save_overlay",
    "side_by_side",
]

#: Names accepted by the ``cmap`` arguments.
COLORMAPS: tuple[str, ...] = ("jet", "inferno", "turbo", "gray")

VisImage = Union[str, os.PathLike, Image.Image, np.ndarray]

# 256 RGB triplets, 6 hex digits each (see the module docstring for the sources).
_INFERNO_HEX = (
    "00000401000501010601010802010a02020c02020e03021004031204031405041706041907051b08051d09061f0a0722"
    "0b07240c08260d08290e092b10092d110a30120a32140b34150b37160b39180c3c190c3e1b0c411c0c431e0c451f0c48"
    "210c4a230c4c240c4f260c51280b53290b552b0b572d0b592f0a5b310a5c320a5e340a5f3609613809623909633b0964"
    "3d09653e0966400a67420a68440a68450a69470b6a490b6a4a0c6b4c0c6b4d0d6c4f0d6c510e6c520e6d540f6d550f6d"
    "57106e59106e5a116e5c126e5d126e5f136e61136e62146e64156e65156e67166e69166e6a176e6c186e6d186e6f196e"
    "71196e721a6e741a6e751b6e771c6d781c6d7a1d6d7c1d6d7d1e6d7f1e6c801f6c82206c84206b85216b87216b88226a"
    "8a226a8c23698d23698f24699025689225689326679526679727669827669a28659b29649d29649f2a63a02a63a22b62"
    "a32c61a52c60a62d60a82e5fa92e5eab2f5ead305dae305cb0315bb1325ab3325ab43359b63458b73557b93556ba3655"
    "bc3754bd3853bf3952c03a51c13a50c33b4fc43c4ec63d4dc73e4cc83f4bca404acb4149cc4248ce4347cf4446d04545"
    "d24644d34743d44842d54a41d74b3fd84c3ed94d3dda4e3cdb503bdd513ade5238df5337e05536e15635e25734e35933"
    "e45a31e55c30e65d2fe75e2ee8602de9612bea632aeb6429eb6628ec6726ed6925ee6a24ef6c23ef6e21f06f20f1711f"
    "f1731df2741cf3761bf37819f47918f57b17f57d15f67e14f68013f78212f78410f8850ff8870ef8890cf98b0bf98c0a"
    "f98e09fa9008fa9207fa9407fb9606fb9706fb9906fb9b06fb9d07fc9f07fca108fca309fca50afca60cfca80dfcaa0f"
    "fcac11fcae12fcb014fcb216fcb418fbb61afbb81dfbba1ffbbc21fbbe23fac026fac228fac42afac62df9c72ff9c932"
    "f9cb35f8cd37f8cf3af7d13df7d340f6d543f6d746f5d949f5db4cf4dd4ff4df53f4e156f3e35af3e55df2e661f2e865"
    "f2ea69f1ec6df1ed71f1ef75f1f179f2f27df2f482f3f586f3f68af4f88ef5f992f6fa96f8fb9af9fc9dfafda1fcffa4"
)
_TURBO_HEX = (
    "30123b32154333184a341b51351e5836215f37246638276d392a733a2d793b2f803c32863d358b3e38913f3b973f3e9c"
    "4040a24143a74146ac4249b1424bb5434eba4451bf4454c34456c74559cb455ccf455ed34661d64664da4666dd4669e0"
    "466be3476ee64771e94773eb4776ee4778f0477bf2467df44680f64682f84685fa4687fb458afc458cfd448ffe4391fe"
    "4294ff4196ff4099ff3e9bfe3d9efe3ba0fd3aa3fc38a5fb37a8fa35abf833adf731aff52fb2f42eb4f22cb7f02ab9ee"
    "28bceb27bee925c0e723c3e422c5e220c7df1fc9dd1ecbda1ccdd81bd0d51ad2d21ad4d019d5cd18d7ca18d9c818dbc5"
    "18ddc218dec018e0bd19e2bb19e3b91ae4b61ce6b41de7b21fe9af20eaac22ebaa25eca727eea42aefa12cf09e2ff19b"
    "32f29835f39438f4913cf58e3ff68a43f78746f8844af8804ef97d52fa7a55fa7659fb735dfc6f61fc6c65fd6969fd66"
    "6dfe6271fe5f75fe5c79fe597dff5680ff5384ff5188ff4e8bff4b8fff4992ff4796fe4499fe429cfe409ffd3fa1fd3d"
    "a4fc3ca7fc3aa9fb39acfb38affa37b1f936b4f836b7f735b9f635bcf534bef434c1f334c3f134c6f034c8ef34cbed34"
    "cdec34d0ea34d2e935d4e735d7e535d9e436dbe236dde037dfdf37e1dd37e3db38e5d938e7d739e9d539ebd339ecd13a"
    "eecf3aefcd3af1cb3af2c93af4c73af5c53af6c33af7c13af8be39f9bc39faba39fbb838fbb637fcb336fcb136fdae35"
    "fdac34fea933fea732fea431fea130fe9e2ffe9b2dfe992cfe962bfe932afe9029fd8d27fd8a26fc8725fc8423fb8122"
    "fb7e21fa7b1ff9781ef9751df8721cf76f1af66c19f56918f46617f36315f26014f15d13f05b12ef5811ed5510ec530f"
    "eb500eea4e0de84b0ce7490ce5470be4450ae2430ae14109df3f08dd3d08dc3b07da3907d83706d63506d43305d23105"
    "d02f05ce2d04cc2b04ca2a04c82803c52603c32503c12302be2102bc2002b91e02b71d02b41b01b21a01af1801ac1701"
    "a91601a71401a41301a112019e10019b0f01980e01950d01920b018e0a018b09028808028507028106027e05027a0403"
)


def _opencv_jet_table() -> np.ndarray:
    """OpenCV's ``COLORMAP_JET`` lookup table as ``uint8 [256, 3]`` RGB, derived step by step.

    Repeats colormap.cpp in float32: control points ``Y`` at ``X[i] = i * float32(1/255)``,
    ``interp1`` evaluated at ``X`` itself (``Y[i-1] + (X[i]-X[i-1]) * (Y[i]-Y[i-1]) /
    (X[i]-X[i-1])`` for ``i > 0``, ``Y[0]`` for ``i = 0``), then ``round_half_even(255 * y)``.
    Skipping the interpolation step would change one entry (``i = 159``: blue 2 instead of 1).
    """
    f32 = np.float32
    idx = np.arange(256)
    x = idx / 255.0
    centers = np.array([1.5, 0.5, -0.5])  # red, green, blue
    control = np.clip(np.minimum(4 * x[:, None] - centers, 3 + centers - 4 * x[:, None]), 0.0, 1.0)
    y = control.astype(f32)
    xs = (idx.astype(f32) * (f32(1) / f32(255))).astype(f32)[:, None]
    dx = xs[1:] - xs[:-1]
    interp = y.copy()
    interp[1:] = y[:-1] + (dx * (y[1:] - y[:-1])) / dx  # float32 throughout, as in interp1_<float>
    return np.rint(interp * f32(255)).astype(np.uint8)


def _hex_table(hex_digits: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_digits), dtype=np.uint8).reshape(256, 3)


def _readonly(table: np.ndarray) -> np.ndarray:
    table = np.ascontiguousarray(table, dtype=np.uint8)
    table.setflags(write=False)
    return table


_TABLES: dict[str, np.ndarray] = {
    "jet": _readonly(_opencv_jet_table()),
    "inferno": _readonly(_hex_table(_INFERNO_HEX)),
    "turbo": _readonly(_hex_table(_TURBO_HEX)),
    "gray": _readonly(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)),
}


def colormap_table(cmap: str = "jet") -> np.ndarray:
    """Return a copy of a colormap's lookup table: ``uint8 [256, 3]``, RGB.

    Raises:
        InvalidInputError: ``cmap`` is not one of :data:`COLORMAPS`.
    """
    return _table(cmap).copy()


def _table(cmap: str) -> np.ndarray:
    if not isinstance(cmap, str) or cmap.lower() not in _TABLES:
        raise InvalidInputError(f"Unknown colormap {cmap!r}. Available colormaps: {', '.join(COLORMAPS)}.")
    return _TABLES[cmap.lower()]


# ----------------------------------------------------------------------------------------------
# Input conversion and validation
# ----------------------------------------------------------------------------------------------


def _as_numpy(array: Any, name: str) -> np.ndarray:
    """numpy array from a numpy array, a torch tensor (any device, any float dtype) or a list."""
    if type(array).__module__.split(".")[0] == "torch" and hasattr(array, "detach"):
        tensor = array.detach().cpu()
        if tensor.is_floating_point() and str(tensor.dtype) != "torch.float64":
            tensor = tensor.float()  # bfloat16 / float16 have no (or a lossy) numpy path
        return tensor.numpy()
    if isinstance(array, (np.ndarray, list, tuple)):
        return np.asarray(array)
    raise InvalidInputError(
        f"{name} must be a numpy array or a torch tensor, got {type(array).__module__}.{type(array).__qualname__}."
    )


def _as_map(anomaly_map: Any, name: str = "anomaly_map") -> np.ndarray:
    """Validated 2-D finite float map; leading axes of size 1 (``[1, H, W]``, ``[1, 1, H, W]``) are dropped."""
    arr = _as_numpy(anomaly_map, name)
    if arr.dtype.kind not in "biuf":
        raise InvalidInputError(f"{name} must hold real numbers, got dtype {arr.dtype}.")
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInputError(
            f"{name} must be a non-empty 2-D array [H, W], got shape {tuple(np.shape(anomaly_map))}. "
            "Pass one map at a time, e.g. anomaly_maps[i]."
        )
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise InvalidInputError(
            f"{name} contains {bad} non-finite value(s) (NaN or inf). "
            "Replace them first, e.g. np.nan_to_num(anomaly_map)."
        )
    return arr


def _resolve_range(values: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """The ``(lo, hi)`` colour range: ``vmin``/``vmax``, or the array's own min/max where None."""
    for label, bound in (("vmin", vmin), ("vmax", vmax)):
        if bound is not None and (not isinstance(bound, (int, float, np.number)) or not np.isfinite(bound)):
            raise InvalidInputError(f"{label} must be a finite number or None, got {bound!r}.")
    if vmin is not None and vmax is not None and vmax < vmin:
        raise InvalidInputError(f"vmax ({vmax}) is smaller than vmin ({vmin}); swap them.")
    lo = float(values.min()) if vmin is None else float(vmin)
    hi = float(values.max()) if vmax is None else float(vmax)
    return lo, hi


def _quantize(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Colormap indices ``uint8 [H, W]``: ``np.uint8(255 * clip((v - lo) / (hi - lo), 0, 1))``.

    Computed in float32 for float32 input (like the official code), else in float64. A degenerate
    range (``hi <= lo``, e.g. a constant map) maps values ``<= lo`` to 0 and larger ones to 255.
    """
    dtype = np.float32 if values.dtype == np.float32 else np.float64
    v = values.astype(dtype, copy=False)
    if hi <= lo:
        return np.where(v > dtype(lo), np.uint8(255), np.uint8(0)).astype(np.uint8)
    norm = (v - dtype(lo)) / (dtype(hi) - dtype(lo))
    np.clip(norm, 0, 1, out=norm)
    return (norm * dtype(255)).astype(np.uint8)  # truncation, as np.uint8(255 * norm)


def apply_colormap(
    values: np.ndarray,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "jet",
) -> np.ndarray:
    """Colour a 2-D array of scores.

    Args:
        values: ``[H, W]`` real-valued array (numpy or torch; leading size-1 axes are dropped).
        vmin, vmax: the values shown with the first and last colour; None uses the array's own
            min / max. Values outside are clipped. A constant array (or ``vmin == vmax``) gets the
            ``vmin`` colour everywhere, with values above it at the last colour.
        cmap: one of :data:`COLORMAPS`.

    Returns:
        ``uint8 [H, W, 3]`` RGB. With the defaults this equals the official AnomalyCLIP heat map
        ``cv2.applyColorMap(np.uint8(255 * normalize(values)), cv2.COLORMAP_JET)[..., ::-1]``.

    Raises:
        InvalidInputError: wrong shape, non-finite values, bad ``vmin``/``vmax``, unknown ``cmap``.
    """
    table = _table(cmap)
    arr = _as_map(values, "values")
    lo, hi = _resolve_range(arr, vmin, vmax)
    return table[_quantize(arr, lo, hi)]


def _as_rgb(image: VisImage, read_options: Any = None) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB from a path (read as :func:`~anomalyclip.preprocessing.load_image`
    does: EXIF orientation applied, 16-bit scaled), a PIL image, a uint8 array (gray, RGB or
    RGBA) or a float array in [0, 1] (what ``load_image`` returns for high-bit-depth files)."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, read_options)
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        if image.size and not (np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0):
            raise InvalidInputError("float image arrays must have finite values in [0, 1].")
        image = np.round(image * 255.0).astype(np.uint8)
    if isinstance(image, Image.Image):
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise InvalidInputError(
                f"Cannot overlay a PIL image of mode '{image.mode}' (16-bit or float). Convert it to "
                "8 bits first, e.g. np.uint8(np.asarray(img) / 65535 * 255)."
            )
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InvalidInputError(
                f"image arrays must be uint8 in [0, 255] or float in [0, 1], got dtype {image.dtype}. "
                "Scale other types first, e.g. x.astype(np.float32) / 65535 for 16-bit."
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] in (3, 4):
            image = image[:, :, :3]
        else:
            raise InvalidInputError(
                f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}. "
                "Channels go last (use np.transpose(x, (1, 2, 0)) for CHW)."
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise InvalidInputError(f"image is empty (shape {image.shape}).")
        return np.ascontiguousarray(image)
    raise InvalidInputError(
        f"image must be a file path, a PIL image or a uint8 numpy array, got "
        f"{type(image).__module__}.{type(image).__qualname__}."
    )


def _resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map to ``[height, width]`` with PIL's 32-bit float ('F') mode."""
    if values.shape == (height, width):
        return values
    img = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32)


def _as_mask(mask: Any, map_shape: tuple[int, int], image_shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``[H, W]`` mask at the image size, from a bool or 0/1 mask at map or image size."""
    arr = _as_numpy(mask, "mask")
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape not in (map_shape, image_shape):
        raise InvalidInputError(
            f"mask shape {tuple(np.shape(mask))} matches neither the anomaly map {map_shape} nor the "
            f"image {image_shape} (both [H, W]). Pass the mask at one of these sizes."
        )
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "biuf" or not np.isin(arr, (0, 1)).all():
            raise InvalidInputError(
                "mask must be boolean or hold only 0 and 1. Threshold it first, e.g. mask > 0 "
                "for a 0/255 PNG mask or anomaly_map > threshold."
            )
        arr = arr.astype(bool)
    if arr.shape != image_shape:
        img = Image.fromarray(arr.astype(np.uint8) * 255, mode="L")
        arr = np.asarray(img.resize((image_shape[1], image_shape[0]), Image.NEAREST)) > 127
    return arr


def _erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion with a 3x3 square; pixels outside the array count as background."""
    padded = np.pad(mask, 1, constant_values=False)
    height, width = mask.shape
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy : dy + height, dx : dx + width]
    return out


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Inner boundary of the mask's regions, ``width`` pixels thick: ``mask & ~eroded(mask)``."""
    eroded = mask
    for _ in range(width):
        eroded = _erode(eroded)
    return mask & ~eroded


def _check_color(color: Any) -> tuple[int, int, int]:
    try:
        values = tuple(int(c) for c in color)
        ok = len(values) == 3 and all(0 <= c <= 255 and c == cc for c, cc in zip(values, color))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidInputError(f"contour_color must be three integers in [0, 255] (R, G, B), got {color!r}.")
    return values  # type: ignore[return-value]


def overlay(
    image: VisImage,
    anomaly_map: Any,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    vmin: float | None = None,
    vmax: float | None = None,
    mask: Any = None,
    contour_color: tuple[int, int, int] = (255, 255, 255),
    contour_width: int = 2,
    read_options: Any = None,
) -> Image.Image:
    """Blend a coloured anomaly map onto an image, at the image's original size.

    Args:
        image: file path (read as ``predict`` reads it, with ``read_options``: EXIF orientation
            applied, 16-bit scaled), PIL image, ``uint8`` numpy array ``HxW``, ``HxWx1``,
            ``HxWx3`` or ``HxWx4`` (alpha dropped, gray repeated to RGB), or float array in [0, 1].
        anomaly_map: float ``[H', W']`` numpy array or torch tensor (leading size-1 axes are
            dropped). If ``(H', W') != (H, W)`` it is resized to the image size with PIL's
            bilinear 32-bit float resize; the colour range is taken from the map before resizing.
        alpha: weight of the heat map, in [0, 1]: ``out = round((1 - alpha) * image + alpha * heat)``
            in float64, halves rounded up. (The official code weights the image by ``alpha`` and
            truncates; with ``alpha = 0.5`` the two differ only by that rounding.)
        cmap: one of :data:`COLORMAPS`.
        vmin, vmax: colour range, see :func:`apply_colormap`. For maps from
            :meth:`AnomalyCLIP.predict`, ``vmin=0, vmax=len(feature_layers)`` keeps colours
            comparable across images; the default rescales each map to its own min/max.
        mask: optional bool (or 0/1) ``[H', W']`` or ``[H, W]`` mask; the inner boundary of its
            regions, ``contour_width`` pixels thick, is drawn on top in ``contour_color``.
        contour_color: RGB of the outline, integers in [0, 255].
        contour_width: outline thickness in pixels (>= 1).
        read_options: how a file ``image`` is read (:class:`~anomalyclip.ImageReadOptions`);
            give the ones ``predict`` used so that a 12-bit image shows as it was scored.

    Returns:
        RGB ``PIL.Image.Image`` of size ``(W, H)``.

    Raises:
        InvalidInputError: bad ``alpha``, ``cmap``, shapes, dtypes or non-finite map values.
        ImageLoadError: ``image`` is a path that is missing or cannot be decoded.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"alpha must be a number in [0, 1] (the heat-map weight), got {alpha!r}.")
    if isinstance(contour_width, bool) or not isinstance(contour_width, (int, np.integer)) or contour_width < 1:
        raise InvalidInputError(f"contour_width must be an integer >= 1 (pixels), got {contour_width!r}.")
    table = _table(cmap)
    color = _check_color(contour_color)
    rgb = _as_rgb(image, read_options)
    values = _as_map(anomaly_map)
    height, width = rgb.shape[:2]
    lo, hi = _resolve_range(values, vmin, vmax)
    heat = table[_quantize(_resize_map(values, height, width), lo, hi)]
    a = float(alpha)
    blended = (1.0 - a) * rgb.astype(np.float64) + a * heat.astype(np.float64)
    out = np.clip(np.floor(blended + 0.5), 0, 255).astype(np.uint8)
    if mask is not None:
        edge = _outline(_as_mask(mask, values.shape, (height, width)), int(contour_width))
        out[edge] = color
    return Image.fromarray(out, mode="RGB")


def save_overlay(path: str | os.PathLike, image: VisImage, anomaly_map: Any, **kwargs: Any) -> Path:
    """Write :func:`overlay` ``(image, anomaly_map, **kwargs)`` to ``path`` as a PNG, atomically.

    The PNG is written to a hidden temporary file in the target directory, then moved over
    ``path`` with ``os.replace``, so readers never see a partial file and an existing file is
    replaced whole. Missing parent directories are created.

    Returns:
        ``Path(path)``.

    Raises:
        InvalidInputError: ``path`` does not end in ``.png``, or any :func:`overlay` error.
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise InvalidInputError(f"save_overlay writes PNG files; '{target}' should end in .png.")
    picture = overlay(image, anomaly_map, **kwargs)
    with atomic_write(target, "wb") as handle:
        # zlib level 1 (OpenCV's default for PNG): a 1024 px overlay encodes in 76 ms instead of
        # Pillow's default level 6's 389 ms, for a 17 % larger file; the pixels are the same
        picture.save(handle, format="PNG", compress_level=1)
    return target


def side_by_side(
    images: Sequence[Image.Image],
    *,
    gap: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Paste images left to right (e.g. ``[image, overlay]``), top-aligned, ``gap`` pixels apart.

    Returns an RGB image ``sum(widths) + gap * (n - 1)`` wide and ``max(heights)`` tall, the
    uncovered area filled with ``background``.

    Raises:
        InvalidInputError: ``images`` is empty or holds something other than PIL images, or
            ``gap`` is negative.
    """
    images = list(images)
    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise InvalidInputError("side_by_side needs a non-empty list of PIL images.")
    if isinstance(gap, bool) or not isinstance(gap, (int, np.integer)) or gap < 0:
        raise InvalidInputError(f"gap must be an integer >= 0 (pixels), got {gap!r}.")
    width = sum(im.width for im in images) + int(gap) * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(im.height for im in images)), _check_color(background))
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width + int(gap)
    return canvas
