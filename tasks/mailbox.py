"""Mailbox sync tasks: the mailboxes (queue ``ingest``), their status (queue ``query``)
and the sync runs (queue ``sync``)."""
import time

from worker.app import SecretRequest, app
from worker.context import current
from worker.mailbox import accounts, sync
from worker.ticks import claim, tick_number


@app.task(name="crm.upsert_mailboxes", secret_arguments=True, Request=SecretRequest)
def upsert_mailboxes(installation_id, mailboxes):
    """The IMAP mailboxes of the installation's users; secrets stored encrypted."""
    return accounts.upsert_mailboxes(current(), installation_id, mailboxes)


@app.task(name="crm.set_mailbox_token", secret_arguments=True, Request=SecretRequest)
def set_mailbox_token(installation_id, user_id, oauth2_access_token):
    """A refreshed OAuth2 access token for the user's mailbox; ends any backoff."""
    return accounts.set_mailbox_token(current(), installation_id, user_id, oauth2_access_token)


@app.task(name="crm.mailbox_status")
def mailbox_status(installation_id, user_id=None):
    """Per mailbox and folder: state, last sync, messages synced, checkpoint, last error."""
    return accounts.mailbox_status(current(), installation_id, user_id)


@app.task(name="crm.sync_mailbox")
def sync_mailbox(installation_id, user_id):
    """One sync run of the user's mailbox, within the time budget."""
    return sync.sync_mailbox(current(), installation_id, user_id)


@app.task(name="crm.sync_mailboxes")
def sync_mailboxes(once_per_tick=False):
    """Enqueue a sync run for each enabled mailbox whose next attempt has come.  Each run
    expires with the tick, so that a slow queue never piles up runs of one mailbox."""
    ctx = current()
    interval, now = ctx.settings.sync_interval, int(time.time())
    if once_per_tick is True and not claim(ctx.redis, "sync_mailboxes", interval, now):
        return {"skipped": "this tick already ran", "tick": tick_number(interval, now)}
    with ctx.engine.connect() as conn:
        due = accounts.due(conn, now)
    for installation_id, user_id in due:
        sync_mailbox.apply_async((installation_id, user_id), queue="sync", expires=interval)
    return {"enqueued": len(due)}
