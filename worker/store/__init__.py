"""The pipeline's database writes, one noun per module.

Every function here is one short transaction and never does network I/O other than Postgres. State
changes are compare-and-set, so a redelivered task cannot write a second transcript or move a job twice:

- `claims`: a job is claimed `queued → processing` in bulk, with a lease and `run_count + 1` (the attempt
  counter lives in Postgres); a group's jobs are claimed by the transcribe stage; a job ends by CAS.
- `groups`: `jobs.group_id` is the token of the current run: prepare gives a job a fresh group each run,
  and a transcribe task touches only jobs whose `group_id` is its own, so a stale task left over from an
  earlier run (requeued by the sweeper) does nothing.
- `dedupe`: identical audio in a tenant is transcribed once (advisory locks, leaders and followers).
- `attempts`: an attempt row is written before its call and closed after it, with its cost record and
  kept answer in the same transaction.
- `answers`: a paid answer is kept (`job_answers`) in the transaction that closes its attempt, for the
  whole file as for each chunk, whatever became of the run: any later run of the job reuses it.
- `batches`, `probes`: the batch options the pipeline reads, what prepare learned about the audio.
- `sql`: the clock, status values and the fixed-SQL helper they share.

Totals are `SET x = x + :delta`, never read-modify-write. The writes that follow a paid provider answer
(closing the attempt with its cost and answer, ending the job) retry through a short database outage
(`durable`, up to a minute): losing them would mean calling the provider again and paying twice, or
leaving a billed call to an estimate. A job's transcript and the batch's end are in worker.completion.
"""
