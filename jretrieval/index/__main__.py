r"""Command line: build an index of a folder of images once, then query it with new images.

    python -m jretrieval.index build --model=baseline --checkpoint_dir=converted \
        --images=photos/ --out=runs/photos_index [--size=724 --pca_dim=512 --bn=pytorch \
        --dba=0 --diffusion --scales=1 --export=npy|faiss]
    python -m jretrieval.index build --checkpoint=converted/simclr2x.h5 \
        --dataset=roxford5k --data_root=data --out=runs/roxford_index
    python -m jretrieval.index query --index=runs/photos_index query.jpg [more.jpg ...] \
        [--bbx=x1,y1,x2,y2 (one per image)] [--k=10] [--aqe=K] [--diffusion] [--json] \
        [--picture=top.png] [--export=npy --out=DIR]

``build`` recalibrates BN on the images, extracts them (resumable: run the same command again
after an interruption), learns the PCA-whitening on them, applies DBA and builds the offline
diffusion stage if asked, and writes one index directory (``jretrieval.index.files``).
``query`` prints rank, score and path of each query's top ``k`` (``--json``: a JSON list).
Bad input (an unreadable image, a box outside the image, a missing or truncated index file, an
index of a newer format, ``--k`` larger than the index, a folder without images) exits with
status 1 (as `python -m jretrieval.main`) and one line naming the file or flag; an existing
index is left untouched.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags, logging

from jretrieval.index import api, export, files, wiring

FLAGS = flags.FLAGS
# The model.
flags.DEFINE_string("model", None, "Model name in the zoo (configs/common.py), e.g. baseline.")
flags.DEFINE_string("checkpoint_dir", "converted", "Folder of converted encoders (--model).")
flags.DEFINE_string("checkpoint", None, "A converted encoder file (.h5) instead of --model.")
# build: the images and settings (the paper's defaults).
flags.DEFINE_string("images", None, "build: index every image under this folder, recursively.")
flags.DEFINE_string("dataset", None, "build: index a known dataset's database images.")
flags.DEFINE_string("data_root", "data", "build: root folder of --dataset.")
flags.DEFINE_string("out", None, "build: the index directory; query --export: its folder.")
flags.DEFINE_integer("size", 724, "build: fixed resize to size x size pixels (the paper).")
flags.DEFINE_integer("pca_dim", 512, "build: PCA-whitening dimensions (0: L2 only).")
flags.DEFINE_enum(
    "bn", "pytorch", ["pytorch", "exact", "none"], "build: BN recalibration (pytorch: the paper)."
)
flags.DEFINE_integer("dba", 0, "build: DBA neighbours (0: off).")
flags.DEFINE_string("scales", "1", "build: image scales, e.g. 1 or 1,0.7071,0.5 ('ms': cirtorch).")
flags.DEFINE_bool(
    "diffusion", False, "build: build the offline diffusion stage; query: rank by online diffusion."
)
flags.DEFINE_enum("export", None, ["npy", "faiss"], "Also write .npy files or a faiss index.")
# query.
flags.DEFINE_string("index", None, "query: the index directory.")
flags.DEFINE_multi_string("bbx", [], "query: crop box x1,y1,x2,y2, one per query image.")
flags.DEFINE_integer("k", 10, "query: results per query image.")
flags.DEFINE_integer("aqe", 0, "query: average query expansion with this many neighbours.")
flags.DEFINE_bool("json", False, "query: print a JSON list instead of a table.")
flags.DEFINE_string("picture", None, "query: write the queries and their top-k to this PNG.")

COMMANDS = ("build", "query")
#: Errors that are the user's input, reported in one line (anything else is a bug: traceback).
USER_ERRORS = (ValueError, OSError, files.IndexFileError, wiring.CorruptImageError)


def _build(args: Sequence[str]) -> None:
    if args:
        raise ValueError(f"build takes no positional arguments; got {list(args)}")
    if not FLAGS.out:
        raise ValueError("--out=INDEX_DIR is required")
    index = api.Index.build(
        FLAGS.out,
        images=FLAGS.images,
        dataset=FLAGS.dataset,
        data_root=FLAGS.data_root if FLAGS.dataset else None,
        model=FLAGS.model,
        checkpoint=FLAGS.checkpoint,
        checkpoint_dir=FLAGS.checkpoint_dir,
        size=FLAGS.size,
        pca_dim=FLAGS.pca_dim,
        bn=FLAGS.bn,
        dba=FLAGS.dba,
        diffusion=FLAGS.diffusion,
        scales=FLAGS.scales,
    )
    stats = index.build_stats
    if FLAGS.export:
        for path in export.export_database(index, FLAGS.export, FLAGS.out):
            print(f"wrote {path}")
    print(
        f"index {FLAGS.out}: {stats['count']} images, {index.database.shape[1]}-d descriptors, "
        f"{stats['seconds']['total']:.1f} s ({stats['images_per_s']:.1f} images/s)"
    )


def _query(args: Sequence[str]) -> None:
    if not FLAGS.index:
        raise ValueError("--index=INDEX_DIR is required")
    if not args:
        raise ValueError("query needs at least one IMAGE after the flags")
    if FLAGS.export and not FLAGS.out:
        raise ValueError(f"--export={FLAGS.export} with query needs --out=DIR for the files")
    boxes = [api.parse_box(b) for b in FLAGS.bbx] or None
    if boxes is not None and len(boxes) != len(args):
        raise ValueError(
            f"--bbx given {len(boxes)} times for {len(args)} images; expected one each"
        )
    index = api.Index.load(FLAGS.index)
    if FLAGS.model or FLAGS.checkpoint:
        index.use_model(
            model=FLAGS.model, checkpoint=FLAGS.checkpoint, checkpoint_dir=FLAGS.checkpoint_dir
        )
    hits = index.query(list(args), boxes, FLAGS.k, aqe=FLAGS.aqe, diffusion=FLAGS.diffusion)
    if FLAGS.json:
        print(json.dumps(export.as_json(args, hits), indent=1))
    else:
        print(export.as_table(args, hits))
    if FLAGS.picture:
        from jretrieval.index import picture

        picture.write(FLAGS.picture, index, args, boxes, hits)
        print(f"wrote {FLAGS.picture}", file=sys.stderr)
    if FLAGS.export:
        written = export.export_queries(index, FLAGS.export, FLAGS.out, args, hits)
        for path in written:
            print(f"wrote {path}", file=sys.stderr)


def main(argv: Sequence[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"expected a command, one of {COMMANDS}: build | query")
    command, args = argv[1], argv[2:]
    try:
        (_build if command == "build" else _query)(args)
    except USER_ERRORS as err:
        message = " ".join(str(err).split())
        logging.debug("%s failed", command, exc_info=True)
        sys.stderr.write(f"error: {message}\n")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
