"""telnetd's answer to a line mode client's special characters (SLC)."""

from __future__ import annotations

from sensor.telnet.telnetd import slc_reply

# What Debian's telnet client sends after WILL LINEMODE (its terminal's characters), and
# what inetutils telnetd answered it on loopback.
DEBIAN_CLIENT = bytes.fromhex(
    "01000003620304020f05000007621c08020409421a0a027f0b02150c02170d02120e02160f0211100213"
    "110000120000"
)
TELNETD_REPLY = bytes.fromhex(
    "03e20304820f07e21c08820409c21a0a827f0b82150c82170d82120e82160f8211108213"
)


def test_matching_characters_are_acknowledged_and_unsupported_ones_left_out() -> None:
    assert slc_reply(DEBIAN_CLIENT) == TELNETD_REPLY


def test_a_character_the_pty_has_otherwise_is_answered_with_the_ptys() -> None:
    # Erase as ^H (a client on a VT100-ish terminal): the pty's DEL comes back, no ACK.
    assert slc_reply(bytes((10, 0x02, 0x08))) == bytes((10, 0x02, 0x7F))


def test_a_function_the_pty_lacks_is_refused() -> None:
    # AYT (5), which a Linux pty has no character for.
    assert slc_reply(bytes((5, 0x02, 0x14))) == bytes((5, 0, 0))
