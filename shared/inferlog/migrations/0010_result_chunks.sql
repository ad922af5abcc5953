-- Where each streamed chunk of a result's text ended (ResultRecord.chunks), and which attempt streamed
-- them (ResultRecord.attempt): a stream cursor (starting_after=N) resumes from the stored result once the
-- live stream has expired, and never joins another attempt's chunks to this result's.
ALTER TABLE results ADD COLUMN chunks integer[], ADD COLUMN attempt text;
