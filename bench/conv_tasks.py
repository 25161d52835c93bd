"""Task data and task metrics for the two real conv models of issue 15 (item 3), shared by bench/compress_real.py.

- det: ddddocr 1.6.1's `common_det.onnx`, a YOLOX-style detector of characters in click captchas. Images are
  rendered (Pillow's built-in font, seeded): a noisy coloured background with 4-6 large characters, letterboxed to
  416x416 with grey 114 and fed as raw 0-255 BGR floats, as ddddocr's own `preproc` does. Boxes are decoded with
  ddddocr's post-processing (grid + stride decode, objectness x class score > 0.1, NMS 0.45). "Kept" = every fp32
  box has a candidate box of IoU >= 0.5, and no extra box appears; the largest score change of a matched box too.
- rec: rapidocr 3.10.0's `PP-OCRv6_rec_small.onnx`. Text lines rendered by bench/ocr_text.py; "unchanged" = the
  CTC-greedy text of every line equals the fp32 model's.

Each model gets three disjoint sets: calibration (fitting), judging (`compress --data`), and evaluation (the task
metric, never seen by the search).

As a task check for `compress --task-check` (on a check set of its own, so the evaluation set stays unseen):
    python bench/conv_tasks.py det|rec CHECK.npz {original} {model} [--max-score-change 0.05] [--margin M]
exits 0 when the task is kept on those images (det: every box, no extra one, no matched box's score moved more than
--max-score-change; with --margin, boxes scoring within M of the 0.1 cut may come and go; rec: every line read as
fp32 reads it), 1 when not, and prints the figure either way. det's check
set is 24 images of its own (8 judging images, 29 boxes, passed a 3.11-bit model that kept 60 of 66 held-out boxes);
rec's is its judging set (12 line images).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))


def det_path() -> Path:
    import real_models

    return real_models.wheel_dir("ddddocr") / "ddddocr" / "common_det.onnx"


def rec_path() -> Path:
    import real_models

    return real_models.wheel_dir("rapidocr") / "rapidocr" / "models" / "PP-OCRv6_rec_small.onnx"


CAPTCHA_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789abdefghknqrty"


def det_images(count: int, seed: int) -> np.ndarray:
    """`count` click-captcha-like images, [count, 3, 416, 416] float32 in 0-255 (BGR), ddddocr's letterbox."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = np.random.default_rng(seed)
    out = np.full((count, 3, 416, 416), 114, np.float32)
    for i in range(count):
        w, h = int(rng.integers(300, 345)), int(rng.integers(150, 200))
        base = rng.integers(120, 256, 3)
        noise = rng.normal(0, 25, (h, w, 3)) + np.linspace(0, 60, w)[None, :, None] * rng.choice([-1, 1])
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 7))):  # clutter lines
            draw.line([tuple(rng.integers(0, [w, h])) for _ in range(2)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                      width=int(rng.integers(1, 3)))
        for k in range(int(rng.integers(4, 7))):
            glyph = Image.new("RGBA", (90, 90), (0, 0, 0, 0))
            font = ImageFont.load_default(size=int(rng.integers(34, 52)))
            colour = tuple(int(v) for v in rng.integers(0, 110, 3)) + (255,)
            ImageDraw.Draw(glyph).text((20, 10), str(rng.choice(list(CAPTCHA_CHARS))), fill=colour, font=font)
            glyph = glyph.rotate(float(rng.uniform(-35, 35)))
            x = int(k * (w - 70) / 6 + rng.integers(0, 25))
            image.paste(glyph, (x, int(rng.integers(0, max(h - 80, 1)))), glyph)
        array = np.asarray(image, np.float32)[:, :, ::-1]  # RGB -> BGR, as cv2 reads
        scale = min(416 / h, 416 / w)
        resized = np.asarray(Image.fromarray(array.astype(np.uint8)).resize((int(w * scale), int(h * scale)), Image.BILINEAR),
                             np.float32)
        out[i, :, : resized.shape[0], : resized.shape[1]] = resized.transpose(2, 0, 1)
    return out


DET_SCORE_CUT = 0.1  # ddddocr keeps boxes whose objectness x class score is above this


def _decode(output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ddddocr's demo_postprocess + class-agnostic NMS: (boxes xyxy [n, 4], scores [n])."""
    predictions = output[0].astype(np.float64).copy()
    grids, strides = [], []
    for stride in (8, 16, 32):
        size = 416 // stride
        xv, yv = np.meshgrid(np.arange(size), np.arange(size))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((size * size, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    predictions[:, :2] = (predictions[:, :2] + grid) * stride
    predictions[:, 2:4] = np.exp(predictions[:, 2:4]) * stride
    scores = (predictions[:, 4:5] * predictions[:, 5:]).max(1)
    xy, wh = predictions[:, :2], predictions[:, 2:4]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
    valid = scores > DET_SCORE_CUT
    boxes, scores = boxes[valid], scores[valid]
    order, keep = scores.argsort()[::-1], []
    while order.size:
        i = order[0]
        keep.append(i)
        ious = _iou(boxes[i], boxes[order[1:]])
        order = order[1:][ious <= 0.45]
    return boxes[keep], scores[keep]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    low, high = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def det_detections(session, images: np.ndarray) -> list:
    name = session.get_inputs()[0].name
    return [_decode(session.run(None, {name: image[None]})[0]) for image in images]


def det_score(reference: list, candidate: list, margin: float = 0.0) -> dict:
    """Boxes kept against the fp32 model's: fp32 boxes matched at IoU >= 0.5, extra boxes, largest score change.
    With `margin`, boxes scoring within it of the cut (DET_SCORE_CUT) may come and go without counting: an fp32 box
    below cut + margin need not be found, a new one below it is not extra (a score allowed to move by the margin
    may cross the cut)."""
    firm = DET_SCORE_CUT + margin
    matched = total = extra = 0
    score_change = 0.0
    for (ref_boxes, ref_scores), (boxes, scores) in zip(reference, candidate):
        used = set()
        for box, score in zip(ref_boxes, ref_scores):
            required = margin <= 0 or score >= firm
            total += required
            ious = _iou(box, boxes) if len(boxes) else np.zeros(0)
            j = int(ious.argmax()) if len(ious) else -1
            if j >= 0 and ious[j] >= 0.5 and j not in used:
                used.add(j)
                matched += required
                score_change = max(score_change, abs(float(scores[j]) - float(score)))
        extra += sum(1 for j in range(len(boxes)) if j not in used and (margin <= 0 or scores[j] >= firm))
    kept = matched == total and extra == 0
    above = f" scoring {firm:.2f}+" if margin > 0 else ""
    return {"boxes": total, "matched": matched, "extra": extra, "max_score_change": score_change, "kept": kept,
            "text": f"{matched}/{total} boxes{above} kept, {extra} extra, max score change {score_change:.3f}"}


def rec_characters(path: Path) -> list[str]:
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ["<blank>"] + meta["character"].splitlines() + [" "]


def rec_sets() -> dict:
    """Calibration, judging and evaluation line images ([n, 3, 48, 320])."""
    from ocr_text import CALIB_LINES, EVAL_LINES, rec_inputs

    judging = ["Invoice total", "Thank you", "Net 30 days", "Cash 20.00", "Due 2027-01-05", "Ref AB-77",
               "Station 14", "Gate B22", "Tax 19%", "Subtotal 88.10", "Table 6", "Visa ****4242"]
    return {"calibration": rec_inputs(CALIB_LINES, 2), "judging": rec_inputs(judging, 3),
            "evaluation": rec_inputs(EVAL_LINES, 1)}


def rec_texts(session, images: np.ndarray, characters: list[str]) -> list[str]:
    from ocr_text import ctc_decode

    texts = []
    for image in images:
        texts += ctc_decode(session.run(None, {"x": image[None]})[0], characters)
    return texts


def rec_score(reference: list[str], candidate: list[str], rendered: list[str] | None = None) -> dict:
    """Lines read as the fp32 model reads them; with `rendered` (the lines' true text), also how many are exact."""
    from ocr_text import edit_distance

    same = sum(a == b for a, b in zip(reference, candidate))
    truth = sum(a == b for a, b in zip(candidate, rendered)) if rendered is not None else None
    changed = [f"'{a}' -> '{b}'" for a, b in zip(reference, candidate) if a != b][:2]
    cer = sum(edit_distance(a, b) for a, b in zip(candidate, reference)) / max(sum(len(a) for a in reference), 1)
    exact = f", {truth} exact vs the rendered text" if truth is not None else ""
    return {"same": same, "lines": len(reference), "kept": same == len(reference), "exact_vs_truth": truth,
            "text": f"{same}/{len(reference)} lines read as fp32 (CER vs fp32 {cer:.3f}){exact}"
                    + (f"; e.g. {'; '.join(changed)}" if changed else "")}


def prepare(model: str, folder: Path) -> dict:
    """Write calibration.npz and judging.npz for `model` ("det" or "rec") into `folder`; return paths and eval data."""
    folder.mkdir(parents=True, exist_ok=True)
    if model == "det":
        path = det_path()
        name = onnx.load(str(path), load_external_data=False).graph.input[0].name
        sets = {"calibration": det_images(16, 0), "judging": det_images(8, 1), "evaluation": det_images(16, 2),
                "check": det_images(24, 3)}
    else:
        path, name, sets = rec_path(), "x", rec_sets()
        sets["check"] = sets["judging"]
    for role in ("calibration", "judging", "check"):
        np.savez(folder / f"{role}.npz", **{name: sets[role]})
    return {"model": path, "calibration": folder / "calibration.npz", "judging": folder / "judging.npz",
            "check": folder / "check.npz", "evaluation": sets["evaluation"]}


def task_metric(model: str, reference_path: Path, candidate_path: Path, evaluation: np.ndarray,
                margin: float = 0.0, held_out: bool = True) -> dict:
    """The task metric of `candidate_path` (.onnx or .shrink) against `reference_path` on the evaluation set (or,
    not `held_out`, on other images: rec's lines are then not compared with the evaluation set's text)."""

    import onnxshrink

    reference, candidate = onnxshrink.session(reference_path), onnxshrink.session(candidate_path)
    if model == "det":
        return det_score(det_detections(reference, evaluation), det_detections(candidate, evaluation), margin)
    characters = rec_characters(reference_path)
    from ocr_text import EVAL_LINES

    return rec_score(rec_texts(reference, evaluation, characters), rec_texts(candidate, evaluation, characters),
                     EVAL_LINES if held_out else None)


DET_MAX_SCORE_CHANGE = 0.05  # "scores kept": no matched box's score (objectness x class) moves more than this


def check(argv: list[str]) -> int:
    """The task check for compress --task-check: 0 when `candidate` keeps the task of `original` on the images."""
    import argparse

    parser = argparse.ArgumentParser(description="task check: exit 0 when the candidate keeps the task on the images")
    parser.add_argument("model", choices=["det", "rec"])
    parser.add_argument("images", help="an .npz of the model's input (the judging set prepare() writes)")
    parser.add_argument("original")
    parser.add_argument("candidate")
    parser.add_argument("--max-score-change", type=float, default=DET_MAX_SCORE_CHANGE,
                        help="det: the largest change of a matched box's score that still counts as kept")
    parser.add_argument("--margin", type=float, default=0.0, help="det: boxes scoring within this of the cut may "
                        "come and go (det_score)")
    args = parser.parse_args(argv)
    with np.load(args.images) as data:
        images = data[data.files[0]]
    score = task_metric(args.model, Path(args.original), Path(args.candidate), images, args.margin, held_out=False)
    print(score["text"])
    kept = score["kept"] and (args.model != "det" or score["max_score_change"] <= args.max_score_change)
    return 0 if kept else 1


if __name__ == "__main__":
    sys.exit(check(sys.argv[1:]))
