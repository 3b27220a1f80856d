"""Mailbox sync: the service reads its users' mailboxes itself over IMAP and stores what it
reads through the path of ``crm.ingest_emails``.

- ``secrets``: passwords and tokens encrypted at rest (``CRM_SECRET_KEY``);
- ``accounts``: the mailboxes, their state, backoff and status (``crm.upsert_mailboxes``,
  ``crm.set_mailbox_token``, ``crm.mailbox_status``);
- ``imap``: one IMAP session (login, folders, STATUS, FETCH), Gmail's extensions;
- ``sync``: one sync run of one mailbox, chunk by chunk, each chunk's checkpoint committed
  with its messages.
"""
