"""The headroom policy alone: rolling mean, hysteresis, a bad file warned about once; and its flags."""

from __future__ import annotations

import logging

import pytest

from shardnet.cli_flags import build_parser
from shardnet.errors import ConfigError
from shardnet.server.config import ServerConfig
from shardnet.server.headroom import Decision, HeadroomFile, HeadroomPolicy, poll_interval_s


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _feed(policy: HeadroomPolicy, clock: Clock, values, step_s: float = 0.5) -> list[Decision]:
    decisions = []
    for value in values:
        clock.now += step_s
        policy.observe(value)
        decisions.append(policy.decide())
    return decisions


def test_the_mean_covers_the_window_only():
    clock = Clock()
    policy = HeadroomPolicy(on=0.6, off=0.4, window_s=2.0, clock=clock)
    assert policy.mean() is None and policy.decide() is Decision.STAY  # nothing read yet: stay
    _feed(policy, clock, [1.0] * 4 + [0.5] * 4)  # 0.5 s apart: the window holds the last 4-5 readings
    assert policy.mean() == pytest.approx(0.5, abs=0.11)
    clock.now += 10  # nothing read for longer than the window: nothing to go on
    assert policy.mean() is None


def test_hysteresis_wobbling_between_the_levels_changes_nothing():
    clock = Clock()
    policy = HeadroomPolicy(on=0.6, off=0.4, window_s=2.0, clock=clock)
    decisions = _feed(policy, clock, [0.45, 0.55] * 20)
    assert set(decisions) == {Decision.STAY} and not policy.resting


def test_rest_below_off_resume_above_on_once_each():
    clock = Clock()
    policy = HeadroomPolicy(on=0.6, off=0.4, window_s=2.0, clock=clock)
    decisions = _feed(policy, clock, [0.9] * 4 + [0.1] * 8)
    assert decisions.count(Decision.REST) == 1 and policy.resting
    assert Decision.REST not in decisions[:4]  # the mean took a reading or two to fall
    decisions = _feed(policy, clock, [0.5] * 8)  # between the levels: still resting
    assert set(decisions) == {Decision.STAY} and policy.resting
    decisions = _feed(policy, clock, [0.9] * 8)
    assert decisions.count(Decision.RESUME) == 1 and not policy.resting
    assert decisions[-1] is Decision.STAY


def test_bad_levels_are_refused():
    for on, off, window in [(0.4, 0.6, 1.0), (0.5, 0.5, 1.0), (1.2, 0.1, 1.0), (0.6, 0.4, 0.0)]:
        with pytest.raises(ValueError):
            HeadroomPolicy(on=on, off=off, window_s=window)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot read it"),
        ("battery full", "is not a number"),
        ("1.7", "outside [0, 1]"),
        ("nan", "outside"),
    ],
    ids=["missing", "garbage", "out_of_range", "nan"],
)
def test_a_bad_file_is_warned_about_once_and_the_last_good_value_kept(tmp_path, caplog, content, why):
    path = tmp_path / "headroom"
    source = HeadroomFile(path)
    if content is not None:
        path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="shardnet.server.headroom"):
        assert [source.read() for _ in range(5)] == [None] * 5  # before any good value: nothing
    assert len(caplog.records) == 1 and why in caplog.records[0].getMessage()
    assert "stays as it is" in caplog.records[0].getMessage()

    path.write_text("0.3\n")
    assert source.read() == 0.3
    caplog.clear()
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="shardnet.server.headroom"):
        assert [source.read() for _ in range(10)] == [0.3] * 10  # the last good value stands in
    assert len(caplog.records) == 1 and "keeping the last good value 0.300" in caplog.records[0].getMessage()


def test_a_policy_fed_by_a_bad_file_keeps_its_state(tmp_path):
    clock = Clock()
    path = tmp_path / "headroom"
    path.write_text("0.1")
    source, policy = HeadroomFile(path), HeadroomPolicy(on=0.6, off=0.4, window_s=2.0, clock=clock)
    assert Decision.REST in _feed(policy, clock, [source.read() for _ in range(4)])
    path.write_text("garbage")
    assert set(_feed(policy, clock, [source.read() for _ in range(10)])) == {Decision.STAY}
    assert policy.resting and policy.mean() == pytest.approx(0.1)


def test_the_poll_interval_follows_the_window():
    assert poll_interval_s(2.0) == pytest.approx(0.2)
    assert poll_interval_s(600.0) == 1.0


def _config(tmp_path, **fields) -> ServerConfig:
    return ServerConfig(model_path=tmp_path, blocks=(0, 2), **fields)


def test_flags_are_validated_with_the_flag_named(tmp_path):
    good = _config(
        tmp_path, headroom_file=tmp_path / "h", headroom_on=0.6, headroom_off=0.4, headroom_window_s=2
    )
    assert good.headroom == (0.6, 0.4, 2)
    assert _config(tmp_path, headroom_file=tmp_path / "h").headroom == (0.5, 0.2, 60.0)
    with pytest.raises(ConfigError, match="--headroom-on and --headroom-off need --headroom-file"):
        _config(tmp_path, headroom_on=0.6, headroom_off=0.4)
    with pytest.raises(
        ConfigError, match=r"--headroom-on \(0.3\) must be greater than --headroom-off \(0.4\)"
    ):
        _config(tmp_path, headroom_file=tmp_path / "h", headroom_on=0.3, headroom_off=0.4)
    with pytest.raises(ConfigError, match="--headroom-off 1.5 is not in"):
        _config(tmp_path, headroom_file=tmp_path / "h", headroom_off=1.5)
    with pytest.raises(ConfigError, match="--headroom-window"):
        _config(tmp_path, headroom_file=tmp_path / "h", headroom_window_s=0)


def test_the_command_line_refuses_bad_values_at_once(capsys):
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--num-blocks", "2", "--headroom-file", "f"])
    assert (args.headroom_on, args.headroom_off, args.headroom_window) == (None, None, None)
    for bad in (
        ["--headroom-on", "2"],
        ["--headroom-off", "x"],
        ["--headroom-window", "0"],
    ):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(["serve", "--model", "m", "--num-blocks", "2", *bad])
        assert exited.value.code == 2
    assert "is not" in capsys.readouterr().err
