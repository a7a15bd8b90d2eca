"""The sensor: SSH and Telnet frontends that proxy attackers into leased guests.

:class:`sensor.service.Sensor` is the process; :mod:`sensor.ssh` the SSH frontend;
the shared :mod:`honeyfleet.spool` and :mod:`honeyfleet.uploader` carry its events
to the controller.
"""
