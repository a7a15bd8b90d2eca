"""The login dialogue: what the attacker sees and what the guest is sent, until login.

Before a guest exists the sensor plays the login itself: the greeting (``telnet_greeting``)
and "Password: ". A guest is leased only for a login that deserves one: with spoofing
once the userdb accepted the password, without it once a password is typed (a scanner
that only types usernames never holds a guest). What the attacker typed at the sensor's
prompts is queued and given to the guest's own prompts as they appear; the guest's
output up to then is held back, since the attacker has already seen the sensor's
version of it. From the first verdict on, the attacker sees the guest's output and
answers its prompts (:mod:`sensor.telnet.login`).

With ``telnet_spoof_authentication`` (the default) the userdb decides each attempt when
its password is typed: a refused one is a failed login at once; an accepted one sends
the guest the lease's username and password. Once a guest is there (after an accepted
login whose guest then refused, say) a refused password goes to it with ``fake``
appended, so the guest itself refuses. Without spoofing the attacker's own credentials
go through and the guest decides (a username or password prompt again: failed; a shell
prompt: logged in). ``cowrie.login.success`` is written only once the attacker is in;
a login that found no guest is a failed one.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from sensor.config import SensorConfig
from sensor.telnet.login import LoginState, Prompt, PromptDetector, transition
from sensor.telnet.loginput import Line, LoginInput
from sensor.userdb import UserDB

PASSWORD_PROMPT = b"Password: "
LOGIN_INCORRECT = b"Login incorrect\r\n"
# Guest output held back while the guest catches up with answers already typed.
MAX_HELD = 64 * 1024
# How each guest prompt moves the dialogue.
PROMPT_STATES = {Prompt.USERNAME: LoginState.USERNAME, Prompt.PASSWORD: LoginState.PASSWORD}


class DialogueHost(Protocol):
    """What the dialogue needs from its connection."""

    def show(self, data: bytes) -> None:
        """Bytes for the attacker's screen (and the recording)."""

    def echo(self, data: bytes) -> None:
        """The echo of the attacker's typing (shown when the client left echoing to us)."""

    def record_input(self, data: bytes) -> None:
        """Keystrokes the recording may keep (never a password's)."""

    def send_guest(self, data: bytes) -> None:
        """Bytes for the guest."""

    def login_attempt(
        self, username: str, password: str, *, accepted: bool, penalise: bool = True
    ) -> None:
        """Log an attempt's verdict (``penalise`` False: refused for want of a guest)."""

    def want_guest(self) -> None:
        """A login deserves a guest: lease one and open its login (then call back)."""

    def refuse(self) -> None:
        """No guest took this attempt: call :meth:`Dialogue.refused` after the usual delay."""

    def logged_in(self, typed_ahead: bytes) -> None:
        """The guest let the attacker in; ``typed_ahead`` is input waiting for its shell."""

    def too_many_attempts(self) -> None:
        """The attacker is past max_auth_attempts."""

    def awaiting_verdict(self, attempt: int) -> None:
        """The guest has the attacker's own password: call :meth:`Dialogue.no_verdict` later."""


class Dialogue:
    """One connection's login, from the greeting to the guest's shell."""

    def __init__(
        self, host: DialogueHost, config: SensorConfig, userdb: UserDB, peer: str = ""
    ) -> None:
        self.state = LoginState.LOCAL
        self.attempts = 0
        self.passwords_sent = 0
        self._host = host
        self._config = config
        self._userdb = userdb
        self._spoof = config.telnet_spoof_authentication
        greeting = config.telnet_greeting.replace("{peer}", peer).encode("utf-8")
        cut = greeting.rfind(b"\n") + 1
        self._banner, self._login_prompt = greeting[:cut], greeting[cut:]
        self._input = LoginInput(
            max_line=config.telnet_max_line,
            max_pending=config.telnet_max_line,
            echo=host.echo,
            record=host.record_input,
        )
        self._detector = PromptDetector(
            username=config.telnet_username_prompt_regex,
            password=config.telnet_password_prompt_regex,
            shell=config.telnet_shell_prompt_regex,
        )
        # Lines typed at the sensor's own prompts, for the guest's; with each password,
        # the userdb's verdict (None when spoofing is off).
        self._queue: deque[tuple[Line, bool | None]] = deque()
        self._held = bytearray()
        self._echo = b""
        self._username = ""
        # An attempt whose verdict the guest will give (spoofing off).
        self._attempt: tuple[str, str] | None = None
        self._credentials = ("", "")

    # The attacker's side.

    def start(self, username: str | None) -> None:
        """Show the greeting; a username from negotiation goes straight to the password."""
        if not username:
            self._host.show(self._banner + self._login_prompt)
            self._input.prompt = Prompt.USERNAME
            return
        self._host.show(self._banner + PASSWORD_PROMPT)
        self._input.prompt = Prompt.PASSWORD
        self._given_username(Line(Prompt.USERNAME, username, b"\r\0"))

    def attacker_data(self, data: bytes) -> None:
        """Keystrokes before login."""
        self._input.feed(data)
        while (line := self._input.next_line()) is not None:
            if line.prompt is Prompt.USERNAME:
                self._username_line(line)
            else:
                self._password_line(line)

    def refused(self) -> None:
        """After a refusal's delay: say so and ask again, as login does."""
        self._host.show(LOGIN_INCORRECT + self._login_prompt)
        self._input.prompt = Prompt.USERNAME
        self.attacker_data(b"")

    def _username_line(self, line: Line) -> None:
        """A username typed at the sensor's prompt or the guest's."""
        if self.state is LoginState.USERNAME:
            self._username = line.text or self._username
            self._send_username(line)
        elif line.text:
            self._host.show(PASSWORD_PROMPT)
            self._input.prompt = Prompt.PASSWORD
            self._given_username(line)
        else:
            self._host.show(self._login_prompt)  # login asks again after an empty name
            self._input.prompt = Prompt.USERNAME

    def _given_username(self, line: Line) -> None:
        """A username at the sensor's prompt: queued for the guest's (if one comes)."""
        self._username = line.text
        self._queue.clear()
        self._queue.append((line, None))

    def _password_line(self, line: Line) -> None:
        """A password typed at the sensor's prompt or the guest's."""
        self.attempts += 1
        if self.attempts > self._config.max_auth_attempts:
            self._host.too_many_attempts()
            return
        accepted = self._judge(line.text)
        if self.state is LoginState.PASSWORD:
            self._send_password(line, accepted)
        elif self.state is not LoginState.LOCAL:
            self._queue.append((line, accepted))
        elif accepted is False:
            self._refuse()  # the userdb said no: no guest for it
        else:
            self._queue.append((line, accepted))
            self._move(LoginState.CONNECTING)
            self._host.want_guest()

    def _judge(self, password: str) -> bool | None:
        """With spoofing, the userdb's verdict; without, None (the guest's).

        A refusal is logged now; an accepted login once the attacker is in (or not).
        """
        if not self._spoof:
            self._attempt = (self._username, password)
            return None
        accepted = self._userdb.check(self._username, password)
        if accepted:
            self._attempt = (self._username, password)
        else:
            self._host.login_attempt(self._username, password, accepted=False)
        return accepted

    def _refuse(self, *, no_guest: bool = False) -> None:
        """A failed login, as far as the attacker can tell (``no_guest``: for want of one)."""
        self._verdict(accepted=False, penalise=not no_guest)
        self._queue.clear()
        self._host.show(b"\r\n")
        self._host.refuse()

    # The guest's side.

    def guest_attached(self, username: str, password: str) -> None:
        """A guest's login is open; these are its credentials (the lease's)."""
        self._credentials = (username, password)
        self._move(LoginState.WAITING)

    def guest_unavailable(self) -> None:
        """No guest could be had; a typed password gets a failed login."""
        self._move(LoginState.LOCAL)
        if any(line.prompt is Prompt.PASSWORD for line, _ in self._queue):
            self._refuse(no_guest=True)
        self._queue.clear()

    def guest_data(self, data: bytes) -> None:
        """Output from the guest: held, shown, and watched for prompts."""
        if self.state is LoginState.LOGGED_IN:
            self._host.show(data)
            return
        self._detector.feed(data)
        if self.state is LoginState.WAITING:
            self._held += data
            del self._held[:-MAX_HELD]
            prompt = self._detector.prompt(Prompt.PASSWORD, Prompt.USERNAME)
        else:
            self._host.show(data)
            prompt = self._verifying_prompt() if self.state is LoginState.VERIFYING else None
        if prompt is Prompt.SHELL:
            self._verdict(accepted=True)
            self._logged_in()
        elif prompt is not None:
            self._guest_prompt(prompt)

    def no_verdict(self, attempt: int) -> None:
        """The guest said nothing conclusive on ``attempt`` for long: take it as logged in."""
        if self.state is LoginState.VERIFYING and attempt == self.attempts:
            self._verdict(accepted=True)
            self._logged_in()

    def _verifying_prompt(self) -> Prompt | None:
        """After a password: a prompt again means it failed; a shell's, that it did not."""
        if self._spoof:
            return self._detector.prompt(Prompt.PASSWORD, Prompt.USERNAME)
        prompt = self._detector.prompt(Prompt.PASSWORD, Prompt.USERNAME, Prompt.SHELL)
        if prompt in PROMPT_STATES:
            self._verdict(accepted=False)
        return prompt

    def _guest_prompt(self, prompt: Prompt) -> None:
        """The guest asks: answer from the queue, or let the attacker answer."""
        held = bytes(self._held)
        self._held.clear()
        self._detector.clear()
        self._move(PROMPT_STATES[prompt])
        queued = self._take_queued(prompt)
        if queued is not None:
            line, accepted = queued
            if prompt is Prompt.USERNAME:
                self._send_username(line)
            else:
                self._send_password(line, accepted)
        elif self._input.prompt is not prompt:
            # The attacker is not already at the sensor's own version of this prompt.
            if shown := self._without_echo(held):
                self._host.show(shown)
            self._input.prompt = prompt
            self.attacker_data(b"")

    def _take_queued(self, prompt: Prompt) -> tuple[Line, bool | None] | None:
        """The queued answer to this prompt, if any (a guest may skip the username)."""
        while self._queue and self._queue[0][0].prompt is not prompt:
            self._queue.popleft()
        return self._queue.popleft() if self._queue else None

    def _send_username(self, line: Line) -> None:
        """Give the guest a username (the lease's, when spoofing; nothing for an empty line)."""
        name = "" if not line.text else self._credentials[0] if self._spoof else line.text
        self._echo = name.encode("utf-8")
        self._host.send_guest(self._echo + line.ending)
        self._detector.clear()
        self._move(LoginState.WAITING)

    def _send_password(self, line: Line, accepted: bool | None) -> None:
        """Give the guest a password: the lease's, the lease's spoiled, or the attacker's."""
        if accepted is None:
            password = line.text
        else:
            password = self._credentials[1] + ("" if accepted else "fake")
        self._host.send_guest(password.encode("utf-8") + line.ending)
        self._detector.clear()
        self.passwords_sent += 1
        if accepted:
            self._logged_in()
            return
        self._move(LoginState.VERIFYING)
        if accepted is None:
            self._host.awaiting_verdict(self.attempts)

    def _without_echo(self, held: bytes) -> bytes:
        """Guest output less its echo of the username the sensor sent (already echoed)."""
        for ending in (b"\r\n", b"\r\0", b"\n"):
            if held.startswith(self._echo + ending):
                return held[len(self._echo) + len(ending) :]
        return held

    def _logged_in(self) -> None:
        """Detection ends; the login is logged; the shell gets what was typed ahead."""
        self._verdict(accepted=True)
        self._move(LoginState.LOGGED_IN)
        self._host.logged_in(self._input.take_pending())

    def _verdict(self, *, accepted: bool, penalise: bool = True) -> None:
        """Log the pending attempt's verdict, once it is known."""
        if self._attempt is not None:
            username, password = self._attempt
            self._attempt = None
            self._host.login_attempt(username, password, accepted=accepted, penalise=penalise)

    def _move(self, new: LoginState) -> None:
        """Change state (illegal moves raise)."""
        self.state = transition(self.state, new)
