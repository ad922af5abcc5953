-- Where each streamed chunk of a result's text ended (ResultRecord.chunks): a stream cursor
-- (starting_after=N) resumes from the stored result once the live stream has expired.
ALTER TABLE results ADD COLUMN chunks integer[];
