"""pack: a coarse stage folder → the fine stage's inputs in ≤15 MiB parts (field fp16, no optimiser);
unpack: the parts → a coarse folder again (fp32 field). Device-run helper, not part of lift3d."""
import io, sys, tarfile, glob
from pathlib import Path
import torch

def half(x):
    if isinstance(x, dict):
        return {k: half(v) for k, v in x.items()}
    if torch.is_tensor(x) and x.dtype == torch.float32 and x.numel() > 100_000:
        return x.half()
    return x

def full(x):
    if isinstance(x, dict):
        return {k: full(v) for k, v in x.items()}
    return x.float() if torch.is_tensor(x) and x.dtype == torch.float16 else x

if sys.argv[1] == "pack":
    src, dst = Path(sys.argv[2]), sys.argv[3]
    ck = torch.load(src / "checkpoint.pt", map_location="cpu", weights_only=False)
    ck["optimizer"] = None
    ck["representation"] = half(ck["representation"])
    buf = io.BytesIO(); torch.save(ck, buf)
    tb = io.BytesIO()
    with tarfile.open(fileobj=tb, mode="w") as tar:
        info = tarfile.TarInfo("checkpoint.pt"); info.size = buf.tell(); buf.seek(0); tar.addfile(info, buf)
        tar.add(src / "reference_rgba.png", "reference_rgba.png")
        cc = src.parent.parent / "cc.bin"
        if cc.is_file() and cc.stat().st_size < 30 << 20:
            tar.add(cc, "cc.bin")
    data, part = tb.getvalue(), 15 << 20
    for i in range(0, len(data), part):
        Path(f"{dst}.part{i // part:02d}").write_bytes(data[i:i + part])
    print(f"packed {len(data) / 2**20:.1f} MiB in {(len(data) + part - 1) // part} parts")
else:
    parts, out = sorted(glob.glob(sys.argv[2] + ".part*")), Path(sys.argv[3])
    data = b"".join(Path(p).read_bytes() for p in parts)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(out / "_unpacked")
    ck = torch.load(out / "_unpacked" / "checkpoint.pt", map_location="cpu", weights_only=False)
    ck["representation"] = full(ck["representation"])
    torch.save(ck, out / "checkpoint.pt")
    (out / "_unpacked" / "reference_rgba.png").rename(out / "reference_rgba.png")
    print("unpacked", parts, "→", out)
