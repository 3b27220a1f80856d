"""Email insight tasks: the directory and raw mail (queue ``ingest``), threads and
contacts (queue ``query``)."""
from worker.app import app
from worker.context import current
from worker.email import directory, ingest, queries


@app.task(name="crm.upsert_clients", bind=True)
def upsert_clients(self, installation_id, clients):
    """Clients with their registrable domains; stored messages re-link."""
    return directory.upsert_clients(current(), installation_id, clients, task_id=self.request.id)


@app.task(name="crm.upsert_users", bind=True)
def upsert_users(self, installation_id, users):
    """The installation's users and the addresses they write from."""
    return directory.upsert_users(current(), installation_id, users, task_id=self.request.id)


@app.task(name="crm.upsert_contacts", bind=True)
def upsert_contacts(self, installation_id, contacts):
    """Contacts with their addresses, organization and job title."""
    return directory.upsert_contacts(current(), installation_id, contacts, task_id=self.request.id)


@app.task(name="crm.ingest_emails", bind=True)
def ingest_emails(self, installation_id, mailbox_user_id, messages):
    """Up to 500 raw messages read from one user's mailbox."""
    return ingest.ingest_emails(current(), installation_id, mailbox_user_id, messages, task_id=self.request.id)


@app.task(name="crm.query_threads")
def query_threads(installation_id, user_id, client_ids=None, contact_source_id=None, awaiting_reply=None,
                  date_from=None, date_to=None, order="desc", limit=20, cursor=None):
    """One page of the user's threads, made of the messages the user may see."""
    return queries.query_threads(current(), installation_id, user_id, client_ids=client_ids,
                                 contact_source_id=contact_source_id, awaiting_reply=awaiting_reply,
                                 date_from=date_from, date_to=date_to, order=order, limit=limit, cursor=cursor)


@app.task(name="crm.get_thread")
def get_thread(installation_id, user_id, thread_id):
    """The visible messages of one thread, in date order."""
    return queries.get_thread(current(), installation_id, user_id, thread_id)


@app.task(name="crm.search_contacts")
def search_contacts(installation_id, user_id, q=None, client_ids=None, job_title=None, limit=20, cursor=None):
    """Contacts of the user's clients by name, address, organization and job title."""
    return queries.search_contacts(current(), installation_id, user_id, q=q, client_ids=client_ids,
                                   job_title=job_title, limit=limit, cursor=cursor)
