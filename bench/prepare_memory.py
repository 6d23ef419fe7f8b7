"""Peak memory and time of decoding one long clip the way `fastcog prepare` does.

Writes a synthetic clip (default: 60 s of 1080p at 30 fps, libx264 if this PyAV has it,
else mpeg4; streamed to disk one frame at a time, so writing it needs little memory), then
decodes it to a training clip (default 49x480x720, reference sampling, stretch) through
`fastcog.data.video.decode_video` in a fresh subprocess per run and reports that process's
peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and the decode's wall time.

`--source DIR` puts DIR first on the child's sys.path, so another checkout of fastcog (e.g.
`git archive HEAD fastcog | tar -x -C /tmp/head`) is measured on the same clip:

    python bench/prepare_memory.py --source /tmp/head --label before --json before.json
    python bench/prepare_memory.py --label after --json after.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[7]))
import fastcog.data.video as video
path, frames, height, width, sampling = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
t0 = time.perf_counter()
clip = video.decode_video(path, frames, height, width, sampling=sampling, rng=torch.Generator().manual_seed(0))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shape": list(clip.shape), "module": video.__file__,
                  "checksum": float(clip.double().sum())}))
"""


def write_clip(path: Path, seconds: float, fps: int, height: int, width: int) -> dict:
    """A moving gradient with a frame counter bar, encoded frame by frame (never all in memory)."""
    import av
    import numpy as np

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    count = int(round(seconds * fps))
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    t0 = time.perf_counter()
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "23"}
        else:
            stream.bit_rate = 8_000_000
        for i in range(count):
            rgb = np.empty((height, width, 3), np.uint8)
            rgb[..., 0] = (xs + 4 * i) % 256
            rgb[..., 1] = (ys + 2 * i) % 256
            rgb[..., 2] = (xs // 8 + ys // 8) % 256
            rgb[: height // 20, : (i * width) // count] = 255
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(tmp, path)
    return {"codec": codec, "frames": count, "fps": fps, "height": height, "width": width,
            "write_seconds": round(time.perf_counter() - t0, 1), "bytes": path.stat().st_size}


def measure(source: Path, clip: Path, frames: int, height: int, width: int, sampling: str, threads: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(source), str(clip), str(frames), str(height), str(width), sampling,
           str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": f"exit {done.returncode}", "stderr": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", default="/tmp/fastcog_bench/clip_60s_1080p.mp4", help="written if missing")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--source", default=str(Path(__file__).resolve().parents[1]), help="fastcog checkout to measure")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--sampling", default="reference", choices=["reference", "uniform", "random"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the child (a prepare worker's share)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", help="write the record here too")
    args = ap.parse_args(argv)

    import av
    import torch

    clip = Path(args.clip)
    clip.parent.mkdir(parents=True, exist_ok=True)
    written = None
    if not clip.is_file():
        written = write_clip(clip, args.seconds, args.fps, 1080, 1920)
        print(f"wrote {clip}: {written}")
    runs = [measure(Path(args.source), clip, args.frames, args.height, args.width, args.sampling, args.threads)
            for _ in range(args.repeat)]
    record = {
        "label": args.label, "source": args.source, "clip": str(clip), "clip_bytes": clip.stat().st_size,
        "written": written, "target": [args.frames, args.height, args.width], "sampling": args.sampling,
        "torch_threads": args.threads, "runs": runs,
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__, "av": av.__version__},
    }
    for run in runs:
        print(f"{args.label or args.source}: {json.dumps(run)}")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
