from speechlm.training.textgen import voice_catalog, voice_split


def test_catalogue_splits_are_disjoint_and_complete(cli):
    train, test = set(voice_catalog("train")), set(voice_catalog("test"))
    assert train and test and not train & test
    assert train | test == set(voice_catalog())
    assert all(voice_split(v) == "test" for v in test)
    r = cli("data", "voices", "--split", "test", "--backends", "espeak", "--comma")
    assert r.returncode == 0 and set(r.stdout.strip().split(",")) == {v for v in test if v.startswith("espeak:")}
