"""POST /v1/explain, GET /v1/dataset/export, POST /v1/dataset/import, and the ONNX and .pt2
downloads, over the real app (TestClient), real stores and real models."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.service.api.conftest import Api, MakeApi, files
from tests.support.http import assert_error
from tests.support.images import image_bytes, labelled_set, noisy_image
from tests.support.versions import publish_version
from training.inference import ATOL, OnnxModule
from training.registry import Registry


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    a = make_api(max_files=8)
    publish_version(Registry(a.home), ["red", "blue", "green"], crop=64)  # v1, no model.onnx
    return a


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# -- explain --------------------------------------------------------------------------------------

def test_explain_differs_between_two_labels(api: Api) -> None:
    image = noisy_image(3, (200, 40, 40), size=96)
    maps = {}
    for label in ("red", "blue"):
        r = api.client.post("/v1/explain", params={"version": "v1"}, data={"label": label},
                            files=files(("x.png", image)))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert r.headers["x-model-version"] == "v1" and r.headers["x-explained-label"] == label
        assert 0 <= float(r.headers["x-explained-score"]) <= 1
        maps[label] = _png(r.content)
        assert maps[label].shape == (64, 64, 3)
    assert np.abs(maps["red"] - maps["blue"]).mean() > 1.0
    top = api.client.post("/v1/explain?version=v1", files=files(("x.png", image)))
    assert top.status_code == 200 and top.headers["x-explained-label"] in ("red", "blue",
                                                                           "green")


def test_explain_refusals(api: Api) -> None:
    c, good = api.client, files(("x.png", noisy_image(4, (9, 9, 9))))
    body = assert_error(c.post("/v1/explain?version=v1&label=cat", files=good), 400,
                        "unknown_class")
    assert "'red'" in body["error"]["message"]
    assert_error(c.post("/v1/explain?version=v9", files=good), 404, "version_not_found")
    assert_error(c.post("/v1/explain?version=../x", files=good), 404)
    assert_error(c.post("/v1/explain", files=files(("a.gif", image_bytes(fmt="GIF")))), 415)
    assert_error(c.post("/v1/explain", data={"label": "x"}), 400, "no_images")
    two = files(("a.png", image_bytes()), ("b.png", image_bytes((1, 2, 3))))
    assert_error(c.post("/v1/explain", files=two), 413, "too_many_files")
    assert_error(c.post("/v1/explain", json={"images": []}), 415)


def test_explain_follows_predict_token_rules(make_api: MakeApi) -> None:
    api = make_api(predict_token="p" * 20)
    image = files(("x.png", noisy_image(5, (40, 40, 200))))
    assert_error(api.client.post("/v1/explain", files=image), 401)
    assert_error(api.client.post("/v1/explain", files=image, headers=api.headers("bad" * 8)),
                 401)
    r = api.client.post("/v1/explain", files=image, headers=api.headers("p" * 20))
    assert r.status_code == 200 and r.headers["x-model-version"] == "v0"


# -- dataset export and import ------------------------------------------------------------------

def _label(api: Api, label: str, images: list[bytes]) -> None:
    r = api.client.post("/v1/labels", data={"label": label}, headers=api.headers(),
                        files=files(*[(f"{i}.png", d) for i, d in enumerate(images)]))
    assert r.status_code == 200, r.text


def _manifest(tar_bytes: bytes) -> dict[str, dict[str, str]]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        f = tar.extractfile("visionloop-dataset/manifest.jsonl")
        assert f is not None
        return {e["sha256"]: e for e in map(json.loads, f.read().decode().splitlines())}


def test_export_then_import_gives_the_same_dataset(api: Api, make_api: MakeApi) -> None:
    pairs = labelled_set(["red", "blue"], 6, size=32, seed=7)
    _label(api, "red", [d for lb, d in pairs if lb == "red"])
    _label(api, "Golden Retriever", [d for lb, d in pairs if lb == "blue"])
    assert_error(api.client.get("/v1/dataset/export"), 401)
    r = api.client.get("/v1/dataset/export", headers=api.headers())
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    exported = _manifest(r.content)
    assert len(exported) >= 12
    assert {e["label"] for e in exported.values()} >= {"red", "Golden Retriever"}
    assert {e["source"] for e in exported.values()} == {"upload"}
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = tar.getnames()
    assert all(n.startswith("visionloop-dataset/") for n in names)
    assert "visionloop-dataset/manifest.csv" in names

    other = make_api(max_files=8)
    answer = other.client.post("/v1/dataset/import", headers=other.headers(),
                               files={"archive": ("d.tar", r.content)})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["added"] == len(exported) and body["failed"] == 0
    again = other.client.get("/v1/dataset/export", headers=other.headers())
    reimported = _manifest(again.content)
    assert {s: (e["label"], e["split"]) for s, e in reimported.items()} == \
        {s: (e["label"], e["split"]) for s, e in exported.items()}
    assert {e["source"] for e in reimported.values()} == {"import:tar"}
    repeat = other.client.post("/v1/dataset/import", headers=other.headers(),
                               files={"archive": ("d.tar", r.content)}).json()
    assert repeat["duplicate"] == len(exported) and repeat["added"] == 0


def test_import_refusals_and_per_file_errors(api: Api) -> None:
    c, auth = api.client, api.headers()
    assert_error(c.post("/v1/dataset/import", files={"archive": ("d.tar", b"no tar")}), 401)
    assert_error(c.post("/v1/dataset/import", headers=auth,
                        files={"archive": ("d.tar", b"not a tar at all")}), 400,
                 "invalid_import")
    assert_error(c.post("/v1/dataset/import", headers=auth, json={}), 415)
    both = [("archive", ("d.tar", b"x")), ("csv", ("l.csv", b"a.png,red"))]
    assert_error(c.post("/v1/dataset/import", headers=auth, files=both), 400, "invalid_import")
    assert_error(c.post("/v1/dataset/import", headers=auth,
                        files=[("csv", ("l.csv", b"a.png,red,extra"))]), 400, "invalid_import")
    # A tar whose image was changed after export: refused by checksum, the rest imported.
    good, changed = noisy_image(41, (1, 2, 3)), noisy_image(42, (3, 2, 1))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        rows = []
        for i, data in enumerate((good, changed)):
            info = tarfile.TarInfo(f"root/train/red/{i}.png")
            body = data if i == 0 else noisy_image(43, (0, 0, 0))
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
            import hashlib

            rows.append({"sha256": hashlib.sha256(data).hexdigest(), "label": "red",
                         "split": "train", "source": "x", "path": f"train/red/{i}.png"})
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        info = tarfile.TarInfo("root/manifest.jsonl")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    r = c.post("/v1/dataset/import", headers=auth, files={"archive": ("d.tar", buf.getvalue())})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x.get("status") for x in results] == ["added", None]
    assert results[1]["error"]["code"] == "checksum_mismatch"


def test_csv_import_reports_per_file(api: Api) -> None:
    a, b = noisy_image(51, (10, 200, 10)), noisy_image(52, (10, 10, 200))
    csv_text = "path,label\na.png,green\nb.png,Deep Blue\nmissing.png,green\nc.gif,green\n"
    parts = [("csv", ("labels.csv", csv_text.encode())),
             ("files", ("a.png", a)), ("files", ("b.png", b)),
             ("files", ("c.gif", image_bytes(fmt="GIF"))),
             ("files", ("stray.png", noisy_image(53, (1, 1, 1))))]
    r = api.client.post("/v1/dataset/import", headers=api.headers(), files=parts)
    assert r.status_code == 200, r.text
    body = r.json()
    by_name = {x["name"]: x for x in body["results"]}
    assert by_name["a.png"]["status"] == "added" and by_name["a.png"]["label"] == "green"
    assert by_name["b.png"]["label"] == "Deep Blue"
    assert by_name["b.png"]["split"] in ("train", "val", "test")
    assert by_name["missing.png"]["error"]["code"] == "missing_file"
    assert by_name["c.gif"]["error"]["code"] == "unsupported_media_type"
    assert by_name["stray.png"]["error"]["code"] == "unlabelled_file"
    assert (body["added"], body["failed"]) == (2, 3)


# -- model downloads ------------------------------------------------------------------------------

def test_onnx_download_matches_eager(api: Api, tmp_path: Path) -> None:
    assert_error(api.client.get("/v1/models/v1/onnx"), 401)
    assert_error(api.client.get("/v1/models/v7/onnx", headers=api.headers()), 404,
                 "version_not_found")
    registry = Registry(api.home)
    for version, origin in (("v1", "exported"), ("v0", "published")):
        r = api.client.get(f"/v1/models/{version}/onnx", headers=api.headers())
        assert r.status_code == 200, r.text
        assert r.headers["x-export-origin"] == origin
        path = tmp_path / f"{version}.onnx"
        path.write_bytes(r.content)
        eager = registry.load(version, engine="eager")
        crop = eager.preset.crop
        x = torch.randn(3, 3, crop, crop, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            diff = float((OnnxModule(path, threads=1)(x) - eager.model(x)).abs().max())
        assert diff <= ATOL, (version, diff)
    # Made once: the second download is the cached file, byte for byte.
    again = api.client.get("/v1/models/v1/onnx", headers=api.headers())
    assert again.content == (tmp_path / "v1.onnx").read_bytes()


LOAD_WITH_TORCH_ONLY = """
import json, sys
import torch, torchvision
from torchvision.transforms import v2 as T
from PIL import Image
extra = {"visionloop.json": ""}
model = torch.export.load(sys.argv[1], extra_files=extra).module()
meta = json.loads(extra["visionloop.json"])
p = meta["preprocessing"]
view = T.Compose([T.PILToTensor(), T.Resize(p["resize"], antialias=True),
                  T.CenterCrop(p["crop"]), T.ToDtype(torch.float32, scale=True)])
x = torch.stack([view(Image.open(f).convert("RGB")) for f in sys.argv[3:]])
with torch.no_grad():
    logits = model(x)
ours = [m for m in sys.modules if m.split(".")[0] in ("training", "service", "tests")]
json.dump({"classes": meta["classes"], "logits": logits.tolist(), "ours": ours},
          open(sys.argv[2], "w"))
"""


def test_pt2_download_loads_with_torch_alone(api: Api, tmp_path: Path) -> None:
    r = api.client.get("/v1/models/v1/pt2", headers=api.headers())
    assert r.status_code == 200, r.text
    artifact = tmp_path / "v1.pt2"
    artifact.write_bytes(r.content)
    images = []
    for i, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(noisy_image(60 + i, colour, size=80))
    out = tmp_path / "out.json"
    # -I: isolated, so neither this repository nor PYTHONPATH is importable in the child.
    subprocess.run([sys.executable, "-I", "-c", LOAD_WITH_TORCH_ONLY, str(artifact), str(out),
                    *map(str, images)], check=True, timeout=300, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["ours"] == []
    eager = Registry(api.home).load("v1", engine="eager")
    assert result["classes"] == eager.classes
    from training.imageio import decode_image

    batch = torch.stack([eager.preset(decode_image(p.read_bytes())) for p in images])
    with torch.inference_mode():
        expected = eager.model(batch)
    assert float((torch.tensor(result["logits"]) - expected).abs().max()) <= ATOL
