"""The protocol-neutral session engine the SSH and Telnet adapters are built on.

* :mod:`sensor.session.core`: :class:`Session`, one attacker session's life (state,
  named timers, admission slot, guest link, events, recording, the end) and
  :class:`Services`, what every session of a sensor uses;
* :mod:`sensor.session.state`: the session state machine;
* :mod:`sensor.session.admission`: the one registry of live sessions of both protocols,
  with OpenSSH-like admission (MaxStartups random early drop, per-address share) and
  :mod:`sensor.session.penalties` (PerSourcePenalties);
* :mod:`sensor.session.frontend`: listening, admitting or refusing, for either protocol;
* :mod:`sensor.session.refusals`: refusing a connection as OpenSSH does, and reporting it;
* :mod:`sensor.session.sources`: what counts as one source in the per-source tables;
* :mod:`sensor.session.guest` and :mod:`sensor.session.budget`: the guest behind a
  session (lease within the guest budget, tunnel) and that budget;
* :mod:`sensor.session.timers`: named timers.

Nothing here imports :mod:`sensor.ssh` or :mod:`sensor.telnet`.
"""
