-- 001's crosslogic_notify_tenancy() referenced NEW.org_id, NEW.env_id and NEW.key_id in one CASE;
-- PL/pgSQL resolves every branch's field against the row, so ANY insert/update/delete on orgs,
-- environments or api_keys failed with 'record "new" has no field "env_id"'. Same payload
-- ('<table>:<id>'), read through jsonb so a missing field is just NULL.

CREATE OR REPLACE FUNCTION crosslogic_notify_tenancy() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_data jsonb;
    row_id text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_data := to_jsonb(OLD);
    ELSE
        row_data := to_jsonb(NEW);
    END IF;
    row_id := row_data ->> CASE TG_TABLE_NAME
        WHEN 'orgs' THEN 'org_id'
        WHEN 'environments' THEN 'env_id'
        WHEN 'api_keys' THEN 'key_id'
    END;
    PERFORM pg_notify('crosslogic_tenancy', TG_TABLE_NAME || ':' || COALESCE(row_id, ''));
    RETURN NULL;
END $$;
