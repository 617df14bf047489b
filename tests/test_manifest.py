import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ppma_ray.data.catalog import CATALOG, load_split, split_file
from ppma_ray.data.manifest import ManifestError, read_manifest


def test_ppma_format_label_after_last_separator_crlf_no_final_newline(tmp_path):
    f = tmp_path / "split.csv"
    f.write_bytes(b"a/x_;0)_y.mp4;25\r\nb/plain.mp4;3\r\nc/with space.mp4;7")
    t = read_manifest(f)
    assert t.column("path").to_pylist() == ["a/x_;0)_y.mp4", "b/plain.mp4", "c/with space.mp4"]
    assert t.column("label").to_pylist() == [25, 3, 7]
    assert t.schema.field("label").type == pa.int64()
    assert t.column("line").to_pylist() == [1, 2, 3]


@pytest.mark.parametrize("text", ["v/a.mp4 1\nv/b.mp4 2\n", "v/a.mp4,1\nv/b.mp4,2\n", "path,label\nv/a.mp4,1\nv/b.mp4,2\n"])
def test_videomae_space_and_csv_formats(tmp_path, text):
    f = tmp_path / "list.txt"
    f.write_text(text)
    t = read_manifest(f, root=tmp_path)
    assert t.column("path").to_pylist() == [str(tmp_path / "v/a.mp4"), str(tmp_path / "v/b.mp4")]
    assert t.column("label").to_pylist() == [1, 2]


def test_a_symlink_under_the_root_that_points_outside_is_refused(tmp_path):
    """Root containment follows symlinks: a link to a file outside the root is an error naming the
    line; links that stay inside, and a root that is itself a link, are fine."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "v").mkdir(parents=True)
    outside.mkdir()
    (data / "v/a.mp4").write_bytes(b"x")
    (outside / "secret.mp4").write_bytes(b"x")
    (data / "v/inside.mp4").symlink_to(data / "v/a.mp4")
    (tmp_path / "linked_root").symlink_to(data)
    f = tmp_path / "m.txt"
    f.write_text("v/a.mp4 1\nv/inside.mp4 2\n")
    for root in (data, tmp_path / "linked_root"):
        assert read_manifest(f, root=root).column("path").to_pylist() == [str(root / "v/a.mp4"), str(root / "v/inside.mp4")]
    (data / "v/escape.mp4").symlink_to(outside / "secret.mp4")
    (data / "w").symlink_to(outside)  # a linked folder
    for line in ("v/escape.mp4 3", "w/secret.mp4 3"):
        f.write_text(f"v/a.mp4 1\nv/inside.mp4 2\n{line}\n")
        with pytest.raises(ManifestError) as e:
            read_manifest(f, root=data)
        assert e.value.line == 3 and "leaves the root through a symlink" in str(e.value)
        assert str(outside / "secret.mp4") in str(e.value)


def test_named_columns_csv_and_parquet(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("label,path,source,start_s,end_s\n4,x.mp4,synthetic,1.5,4.0\n5,y.mp4,nohuman,,\n")
    t = read_manifest(f)
    assert t.column_names == ["path", "label", "line", "source", "start_s", "end_s"]
    assert t.column("source").to_pylist() == ["synthetic", "nohuman"]
    assert t.column("start_s").to_pylist() == [1.5, None]
    pq.write_table(pa.table({"path": ["x.mp4"], "label": [9], "source": ["s"]}), tmp_path / "m.parquet")
    t = read_manifest(tmp_path / "m.parquet")
    assert t.column("label").to_pylist() == [9] and t.column("source").to_pylist() == ["s"]


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("a.mp4;1\nb.mp4;x\n", 2, "not an integer"),
        ("a.mp4;1\n\nb.mp4;2\n", 2, "empty line"),
        ("a.mp4;1\n../../etc/passwd;2\n", 2, "escapes the root"),
        ("/abs/a.mp4;1\n", 1, "absolute"),
        ("path,label\na.mp4,1\nb.mp4,\n", 3, "'label'"),
    ],
)
def test_malformed_manifests_name_file_line_and_problem(tmp_path, text, line, words):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(ManifestError) as e:
        read_manifest(f, root=tmp_path / "data")
    assert e.value.line == line and words in str(e.value) and str(f) in str(e.value)
    assert f"bad.csv:{line}:" in str(e.value)


def test_missing_manifest_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_shipped_split_loads_with_the_catalog_class_count(name):
    info = CATALOG[name]
    for split in info.splits:
        labels = set(load_split(name, split).column("label").to_pylist())
        assert max(labels) == info.num_classes - 1
        missing = set(range(info.num_classes)) - labels
        # Diving48's V2 lists never use label 30; every other list covers all classes
        assert missing == ({30} if name == "diving48" else set())


def test_known_split_sizes_and_missing_train_lists():
    assert load_split("ucf101", "train").num_rows == 9537
    assert load_split("hmdb51", "train").num_rows == 3570
    assert load_split("sim150", "val").num_rows == 12547
    with pytest.raises(FileNotFoundError, match="not part of the PPMA release"):
        split_file("kinetics150", "train")


def test_errors_survive_pickling_and_copying():
    import copy
    import pickle

    from ppma_ray.data.video import VideoDecodeError

    for e in (ManifestError("m.csv", 3, "bad label"), VideoDecodeError("v.mp4", "truncated")):
        for clone in (pickle.loads(pickle.dumps(e)), copy.copy(e)):
            assert type(clone) is type(e) and str(clone) == str(e)


@pytest.mark.parametrize("case", ["relative without root", "bad label", "escapes root"])
def test_pretrain_rejects_a_manifest_that_cannot_work_before_ray_starts(case, tmp_path, capsys, monkeypatch):
    """Manifest problems used to surface inside the Ray worker, 30-50 s later; a relative manifest
    without a root failed every decode. Now: one line naming the file (and line), exit 2, no Ray."""
    from ppma_ray.cli import pretrain

    monkeypatch.setattr(pretrain, "start_ray", lambda cfg: pytest.fail("the job started Ray"))
    lines = {"relative without root": "videos/a.mp4;0\n", "bad label": "videos/a.mp4;-1\n",
             "escapes root": "../a.mp4;0\n"}[case]
    (tmp_path / "train.csv").write_text(lines)
    root = [] if case == "relative without root" else ["--set", f"data.sources.nohuman.root={tmp_path}"]
    with pytest.raises(SystemExit) as exit_:
        pretrain.main(["--stage", "mae", "--set", f"data.sources.nohuman.manifest={tmp_path / 'train.csv'}", *root])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    expected = {"relative without root": "data.sources.nohuman.root is not set", "bad label": "train.csv:1",
                "escapes root": "escapes the root"}[case]
    assert str(tmp_path / "train.csv") in err and expected in err, err


def test_kinetics_csv_names_the_trimmed_clips_and_maps_class_names_to_sorted_ids(tmp_path):
    """Kinetics' own CSV (quoted class names with commas included); ids follow the sorted names."""
    from ppma_ray.data.manifest import label_map_of

    f = tmp_path / "train.csv"
    f.write_text('label,youtube_id,time_start,time_end,split\n'
                 '"passing American football (in game)",-_1WOF-LMdM,30,40,train\n'
                 'abseiling,0347ZoDXyP0,5,15,train\n'
                 '"passing American football (in game)",zzz,0,10,train\n')
    t = read_manifest(f, root=tmp_path / "k400")
    assert t.column("path").to_pylist() == [str(tmp_path / "k400" / p) for p in
                                            ("-_1WOF-LMdM_000030_000040.mp4", "0347ZoDXyP0_000005_000015.mp4", "zzz_000000_000010.mp4")]
    assert t.column("label").to_pylist() == [1, 0, 1] and t.column("line").to_pylist() == [2, 3, 4]
    assert label_map_of(t) == {"abseiling": 0, "passing American football (in game)": 1}
    f.write_text("label,youtube_id,time_start,time_end,split\nabseiling,x,five,15,train\n")
    with pytest.raises(ManifestError, match=r"train.csv:2: time_start / time_end are not numbers"):
        read_manifest(f)


def test_something_something_v2_json_labels_by_template_with_a_given_label_map(tmp_path):
    import json

    items = [{"id": "78687", "label": "holding potato next to vicks vaporub bottle",
              "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks"]},
             {"id": "42326", "label": "moving a pen up", "template": "Moving [something] up", "placeholders": ["a pen"]}]
    (tmp_path / "train.json").write_text(json.dumps(items))
    labels = {"Holding something next to something": 43, "Moving something up": 94}  # the dataset's labels.json
    (tmp_path / "labels.json").write_text(json.dumps({k: str(v) for k, v in labels.items()}))  # ids as strings, as there
    t = read_manifest(tmp_path / "train.json", root=tmp_path / "videos", label_map=tmp_path / "labels.json")
    assert t.column("path").to_pylist() == [str(tmp_path / "videos/78687.webm"), str(tmp_path / "videos/42326.webm")]
    assert t.column("label").to_pylist() == [43, 94]
    (tmp_path / "test.json").write_text(json.dumps([{"id": "1420"}]))
    with pytest.raises(ManifestError, match=r"test.json:1: item without a 'template' \(the test list has no labels\)"):
        read_manifest(tmp_path / "test.json")
    with pytest.raises(ManifestError, match=r"train.json:2: label 'Moving something up' is not in the given label map \(1 classes\)"):
        read_manifest(tmp_path / "train.json", label_map={"Holding something next to something": 0})


def test_named_labels_the_held_out_list_takes_the_training_ids(tmp_path):
    """A held-out list with fewer classes keeps the training list's ids (what the job's early check
    returns, and writes next to its outputs); a typo among integer ids is an error, not a new class."""
    from ppma_ray.cli import check_manifests_exist
    from ppma_ray.config import load_config
    from conftest import DEMO_CONFIG, TINY

    (tmp_path / "train.csv").write_text("path,label\na.mp4,walk\nb.mp4,run\nc.mp4,swim\n")
    (tmp_path / "val.csv").write_text("path,label\nd.mp4,swim\n")
    cfg = load_config(DEMO_CONFIG, [*TINY, "mae.samples_per_epoch=32",  # 3 videos: an epoch of one batch
                                    f"data.sources.nohuman={{manifest: {tmp_path / 'train.csv'}, "
                                    f"val_manifest: {tmp_path / 'val.csv'}, root: {tmp_path}}}"])
    assert check_manifests_exist(cfg, ("mae",)) == {"nohuman": {"run": 0, "swim": 1, "walk": 2}}
    from ppma_ray.train.data import resolve_sources

    (src,) = resolve_sources(cfg.data, ["nohuman"])
    assert src.train.table.column("label").to_pylist() == [2, 0, 1] and src.val.table.column("label").to_pylist() == [1]
    (tmp_path / "typo.csv").write_text("a.mp4;1\nb.mp4;2\nc.mp4;tow\n")
    with pytest.raises(ManifestError, match=r"typo.csv:3: field 'label' is not an integer"):
        read_manifest(tmp_path / "typo.csv")
