"""The Telnet login state machine and prompt detection with the default expressions."""

from __future__ import annotations

import pytest

from honeyfleet.errors import FailedPrecondition
from sensor.config import SensorConfig
from sensor.telnet.login import ALLOWED, LoginState, Prompt, PromptDetector, transition


def test_every_legal_move_is_allowed_and_every_other_refused() -> None:
    for current in LoginState:
        for new in LoginState:
            if new in ALLOWED[current]:
                assert transition(current, new) is new
            else:
                with pytest.raises(FailedPrecondition, match=current.value):
                    transition(current, new)


def test_logged_in_is_final_and_reachable_only_through_a_password() -> None:
    assert ALLOWED[LoginState.LOGGED_IN] == frozenset()
    sources = {state for state, targets in ALLOWED.items() if LoginState.LOGGED_IN in targets}
    assert sources == {LoginState.PASSWORD, LoginState.VERIFYING}


def detector(config: SensorConfig | None = None) -> PromptDetector:
    config = config or SensorConfig()
    return PromptDetector(
        username=config.telnet_username_prompt_regex,
        password=config.telnet_password_prompt_regex,
        shell=config.telnet_shell_prompt_regex,
    )


ALL = (Prompt.PASSWORD, Prompt.USERNAME, Prompt.SHELL)


@pytest.mark.parametrize(
    ("output", "prompt"),
    [
        # busybox telnetd + login (the shipped guest image)
        (b"\r\r\nDebian GNU/Linux 12\r\n\r\r\nsrv04 login: ", Prompt.USERNAME),
        (b"Password: ", Prompt.PASSWORD),
        (b"\r\nLogin incorrect\r\nsrv04 login: ", Prompt.USERNAME),
        (b"\r\nBusyBox v1.36.1 built-in shell (ash)\r\n\r\n~ # ", Prompt.SHELL),
        # Debian/Ubuntu (util-linux login), CR NUL line ends as in the seeds
        (b"Ubuntu 18.04.6 LTS\r\0ubuntu login: ", Prompt.USERNAME),
        (b"ubuntu login: admin\r\0Password: ", Prompt.PASSWORD),
        (b"Last login: Tue Nov 21 10:00:00 UTC 2026 on pts/0\r\nadmin@ubuntu:~$ ", Prompt.SHELL),
        # OpenWRT
        (b"\r\nOpenWrt login: ", Prompt.USERNAME),
        (b"\x1b[1;32mroot@OpenWrt\x1b[0m:~# \x1b[0m", Prompt.SHELL),
        # routers asking for a "Username:"
        (b"\r\nUser Access Verification\r\n\r\nUsername: ", Prompt.USERNAME),
        (b"\nrouter>", Prompt.SHELL),
        # nothing to answer yet
        (b"Debian GNU/Linux 12\r\n", None),
        (b"srv04 login: root\r\n", None),
        (b"Last login: Tue Nov 21 on pts/0\r\n", None),
    ],
)
def test_default_expressions_find_busybox_debian_and_openwrt_prompts(
    output: bytes, prompt: Prompt | None
) -> None:
    found = detector()
    found.feed(output)
    assert found.prompt(*ALL) is prompt


def test_prompts_split_across_reads_are_found_and_clear_forgets() -> None:
    found = detector()
    for byte in b"Debian GNU/Linux 12\r\nsrv04 log":
        found.feed(bytes([byte]))
        assert found.prompt(*ALL) is None
    found.feed(b"in: ")
    assert found.prompt(*ALL) is Prompt.USERNAME
    found.clear()
    assert found.prompt(*ALL) is None


def test_only_the_wanted_prompts_are_looked_for() -> None:
    found = detector()
    found.feed(b"srv04:~# ")
    assert found.prompt(Prompt.PASSWORD, Prompt.USERNAME) is None
    assert found.prompt(Prompt.PASSWORD, Prompt.USERNAME, Prompt.SHELL) is Prompt.SHELL


def test_cowries_own_expressions_work_unchanged() -> None:
    cowrie = SensorConfig(
        telnet_username_prompt_regex=r"(\n|^)ubuntu login: .*",
        telnet_password_prompt_regex=r".*Password: .*",
    )
    found = detector(cowrie)
    found.feed(b"Ubuntu 18.04 LTS\r\nubuntu login: ")
    assert found.prompt(Prompt.PASSWORD, Prompt.USERNAME) is Prompt.USERNAME
    found.clear()
    found.feed(b"Password: ")
    assert found.prompt(Prompt.PASSWORD, Prompt.USERNAME) is Prompt.PASSWORD


def test_only_the_recent_output_is_kept() -> None:
    found = detector()
    found.feed(b"x" * 100_000 + b"\r\nsrv04 login: ")
    assert found.prompt(*ALL) is Prompt.USERNAME


def test_a_long_read_is_cut_to_its_end_before_it_is_normalised() -> None:
    found = detector()
    found.feed(b"srv04 login: ")
    # 80 KB of colour codes ending in a prompt: only the end is normalised and searched.
    found.feed(b"\x1b[0m" * 20_000 + b"\r\nPassword: \x1b[0m")
    assert found.prompt(*ALL) is Prompt.PASSWORD
    found.feed(b"x" * 100_000)
    assert found.prompt(*ALL) is None
