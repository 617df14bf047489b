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
    lines = {"relative without root": "videos/a.mp4;0\n", "bad label": "videos/a.mp4;zero\n",
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
