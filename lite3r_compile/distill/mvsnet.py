"""Readers (and writers, for tests and conversions) of the MVSNet file formats in which
BlendedMVS and DTU are distributed.

- camera file ``cams/XXXXXXXX_cam.txt``::

      extrinsic
      r11 r12 r13 t1        (4 x 4 world-to-camera matrix)
      ...
      intrinsic
      fx 0 cx               (3 x 3)
      ...
      depth_min depth_interval [depth_num depth_max]

- pair file ``pair.txt``: the number of views, then per view its index and a line
  ``n  src_0 score_0  src_1 score_1 ...``.
- PFM depth maps: a ``Pf`` (1 channel) or ``PF`` (3 channels) header, ``width height``, a scale
  whose sign gives the byte order (negative: little endian), then float32 rows stored bottom to top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class MVSCamera:
    """One camera of an MVSNet camera file: world-to-camera extrinsic (4, 4), intrinsic (3, 3),
    and the depth range the file gives (``depth_max`` may be absent)."""

    extrinsic: np.ndarray
    intrinsic: np.ndarray
    depth_min: float
    depth_interval: float
    depth_num: int | None = None
    depth_max: float | None = None


def read_cam_file(path: str | Path) -> MVSCamera:
    path = Path(path)
    words = path.read_text().split()
    try:
        e = words.index("extrinsic")
        i = words.index("intrinsic")
        extrinsic = np.array(words[e + 1 : e + 17], dtype=np.float64).reshape(4, 4)
        intrinsic = np.array(words[i + 1 : i + 10], dtype=np.float64).reshape(3, 3)
        depth = [float(w) for w in words[i + 10 :]]
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{path}: not an MVSNet camera file ({exc})") from exc
    if len(depth) < 2:
        raise ValueError(f"{path}: the depth range line needs at least depth_min and depth_interval")
    return MVSCamera(
        extrinsic=extrinsic,
        intrinsic=intrinsic,
        depth_min=depth[0],
        depth_interval=depth[1],
        depth_num=int(depth[2]) if len(depth) > 2 else None,
        depth_max=depth[3] if len(depth) > 3 else None,
    )


def write_cam_file(path: str | Path, camera: MVSCamera) -> None:
    lines = ["extrinsic"]
    lines += [" ".join(f"{x:.9g}" for x in row) for row in camera.extrinsic]
    lines += ["", "intrinsic"]
    lines += [" ".join(f"{x:.9g}" for x in row) for row in camera.intrinsic]
    depth = [camera.depth_min, camera.depth_interval]
    if camera.depth_num is not None:
        depth.append(camera.depth_num)
        if camera.depth_max is not None:
            depth.append(camera.depth_max)
    lines += ["", " ".join(f"{x:.9g}" for x in depth), ""]
    Path(path).write_text("\n".join(lines))


def read_pair_file(path: str | Path) -> dict[int, list[tuple[int, float]]]:
    """View index -> its source views with scores, best first as the file lists them."""
    path = Path(path)
    words = path.read_text().split()
    try:
        n = int(words[0])
        pos, pairs = 1, {}
        for _ in range(n):
            ref = int(words[pos])
            count = int(words[pos + 1])
            src = words[pos + 2 : pos + 2 + 2 * count]
            if len(src) != 2 * count:
                raise IndexError("truncated source list")
            pairs[ref] = [(int(src[2 * k]), float(src[2 * k + 1])) for k in range(count)]
            pos += 2 + 2 * count
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{path}: not an MVSNet pair file ({exc})") from exc
    return pairs


def write_pair_file(path: str | Path, pairs: dict[int, list[tuple[int, float]]]) -> None:
    lines = [str(len(pairs))]
    for ref, src in pairs.items():
        lines.append(str(ref))
        lines.append(" ".join([str(len(src))] + [f"{i} {s:.6g}" for i, s in src]))
    Path(path).write_text("\n".join(lines) + "\n")


def read_pfm(path: str | Path) -> np.ndarray:
    """A PFM image as float32 (H, W) or (H, W, 3), top row first."""
    path = Path(path)
    with path.open("rb") as f:
        header = f.readline().strip()
        if header not in (b"Pf", b"PF"):
            raise ValueError(f"{path}: not a PFM file (header {header[:8]!r})")
        channels = 1 if header == b"Pf" else 3
        try:
            width, height = (int(x) for x in f.readline().split())
            scale = float(f.readline().strip())
        except ValueError as exc:
            raise ValueError(f"{path}: malformed PFM header ({exc})") from exc
        dtype = "<f4" if scale < 0 else ">f4"
        data = np.frombuffer(f.read(), dtype=dtype)
    expected = width * height * channels
    if data.size != expected:
        raise ValueError(f"{path}: PFM holds {data.size} values, header says {width}x{height}x{channels}")
    shape = (height, width) if channels == 1 else (height, width, 3)
    return np.flipud(data.reshape(shape)).astype(np.float32)


def write_pfm(path: str | Path, image: np.ndarray) -> None:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        header = b"Pf"
    elif image.ndim == 3 and image.shape[2] == 3:
        header = b"PF"
    else:
        raise ValueError(f"write_pfm: need (H, W) or (H, W, 3), got {image.shape}")
    with Path(path).open("wb") as f:
        f.write(header + b"\n")
        f.write(f"{image.shape[1]} {image.shape[0]}\n".encode())
        f.write(b"-1.0\n")  # little endian
        f.write(np.flipud(image).astype("<f4").tobytes())
