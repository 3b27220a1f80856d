"""Email insight: raw messages from users' mailboxes into one identified, threaded,
linked and secured record each (``crm.ingest_emails`` and the directory tasks), and the
thread and contact queries over them.

- ``parse``: raw RFC 5322 bytes -> headers, key, participants, references (stdlib,
  ``compat32``: it reads what real mail holds without raising).
- ``addresses``: canonical addresses, registrable domains, free-mail domains, folding.
- ``directory``: clients and their domains, the installation's users, contacts.
- ``store``: ``crm.ingest_emails``.
- ``threads``: thread ids from References/In-Reply-To (with ghost ids) and subjects.
- ``links``: who an email links to and who may see it; re-linking after changes.
- ``queries``: ``crm.query_threads``, ``crm.get_thread``, ``crm.search_contacts``.
"""
