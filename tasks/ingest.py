"""Ingestion tasks (queue ``ingest``)."""
from worker.app import app
from worker.db import get_engine
from worker.ingest import delete, ingest
from worker.redis_index import get_redis
from worker.settings import get_settings


@app.task(name="crm.ingest_meetings", bind=True)
def ingest_meetings(self, records):
    """Up to 1,000 meeting records of any installations; see the README."""
    return ingest(get_engine(), get_redis(), records, chunk_size=get_settings().ingest_chunk, task_id=self.request.id)


@app.task(name="crm.delete_meetings", bind=True)
def delete_meetings(self, installation_id, source_ids):
    """Delete meetings by source id; they leave every query at once."""
    return delete(get_engine(), get_redis(), installation_id, source_ids, chunk_size=get_settings().ingest_chunk,
                  task_id=self.request.id)
