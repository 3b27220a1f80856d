"""Ingestion tasks (queue ``ingest``)."""
from worker.app import app
from worker.context import current
from worker.ingest import delete, ingest


@app.task(name="crm.ingest_meetings", bind=True)
def ingest_meetings(self, records):
    """Up to 1,000 meeting records of any installations; see the README."""
    return ingest(current(), records, task_id=self.request.id)


@app.task(name="crm.delete_meetings", bind=True)
def delete_meetings(self, installation_id, source_ids):
    """Delete meetings by source id; they leave every query at once."""
    return delete(current(), installation_id, source_ids, task_id=self.request.id)
