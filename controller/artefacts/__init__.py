"""The controller's artefact store: content-addressed files on local disk, their index,
and the ArtefactService that sensors and pool nodes upload to and admins read from."""

from controller.artefacts.service import ArtefactServicer
from controller.artefacts.store import ArtefactStore

__all__ = ["ArtefactServicer", "ArtefactStore"]
