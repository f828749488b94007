-- Issue 9 item 5: `n` (and completions' best_of) is capped per model. Every choice is generated and reserved
-- (n x max_tokens), so an operator bounds what one request may cost a node. 128 is OpenAI's own ceiling.
-- The models trigger of 001 already notifies ext_authz, which reloads its catalogue.
ALTER TABLE models ADD COLUMN max_n integer NOT NULL DEFAULT 128 CHECK (max_n > 0);
