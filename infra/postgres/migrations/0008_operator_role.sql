-- A deployment's operators (the console at /ops spans every company) are no longer a company's
-- admins: `admin` stays a company role, `operator` is the deployment's.
ALTER TABLE users DROP CONSTRAINT users_role_check;
ALTER TABLE users ADD CONSTRAINT users_role_check CHECK (role IN ('agent', 'admin', 'operator'));
