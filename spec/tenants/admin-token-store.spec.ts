/**
 * Admin token lifetimes in the control plane itself, with an injected clock: expiry at the
 * instant (and why a token is refused: unknown, revoked, expired), cascade revocation on SQLite
 * and PostgreSQL, control planes created before issuers and expiries (the table made the old
 * way, then opened: the columns are added, old tokens keep working and never expire) on both,
 * and `control-plane copy` carrying the new columns from SQLite to PostgreSQL.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { QueryTypes, Sequelize } from 'sequelize';
import { controlPlaneWritesDone } from '../helpers/control-plane-writes.ts';
import { sqliteExec } from '../helpers/sqlite-exec.ts';
import {
  AdminAuthError,
  authorize,
  ConflictError,
  copyControlPlane,
  ForbiddenError,
  hashAdminToken,
  InvalidInputError,
  openControlPlane,
} from '../../tenants/index.ts';
import type { ControlPlane, NewAdminToken } from '../../tenants/index.ts';
import { createAdminTokenRepository } from '../../tenants/admin-token-repository.ts';
import type {
  AdminTokenCheck,
  AdminTokenInfoWithLifetime,
  IssuedAdminTokenWithExpiry,
  NewAdminTokenInput,
} from '../../tenants/admin-token-repository.ts';
import { defineControlPlaneModels } from '../../tenants/control-plane-models.ts';
import type { WriteTx } from '../../tenants/control-plane-models.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;
const RUN_ID = crypto.randomBytes(4).toString('hex');
const T0 = '2025-01-01T00:00:00.000Z';
const DAY_MS = 24 * 60 * 60 * 1000;
const plusDays = (iso: string, days: number) =>
  new Date(Date.parse(iso) + days * DAY_MS).toISOString();

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

/** `issue` with the lifetime fields (the control plane passes them through). */
const issue = (cp: ControlPlane, input: NewAdminTokenInput) => {
  const wide: NewAdminToken = input;
  return cp.adminTokens.issue(wide) as Promise<IssuedAdminTokenWithExpiry>;
};
const listOf = async (cp: ControlPlane) =>
  (await cp.adminTokens.list()) as AdminTokenInfoWithLifetime[];
const rowOf = async (cp: ControlPlane, id: string) => {
  const row = (await listOf(cp)).find((t) => t.id === id);
  expect(row, id).to.not.equal(undefined);
  return row!;
};

/** An old-format token and its row, as a control plane before lifetimes stored it. */
function oldToken(): { id: string; token: string; hash: string } {
  const token = `ccds_${crypto.randomBytes(32).toString('base64url')}`;
  return {
    id: `tok_${crypto.randomBytes(12).toString('hex')}`,
    token,
    hash: hashAdminToken(token),
  };
}

/** The behaviours every backend must show; `open` opens a control plane on the test's store. */
function lifetimeBehaviours(open: () => Promise<ControlPlane>, setClock: (iso: string) => void) {
  it('expires a token at expiresAt (default 90 days), not a millisecond before', async () => {
    const cp = await open();
    const tok = await issue(cp, { role: 'rule-author' });
    expect(tok.expiresAt).to.equal(plusDays(T0, 90));
    expect((await rowOf(cp, tok.id)).expiresAt).to.equal(tok.expiresAt);
    setClock(new Date(Date.parse(tok.expiresAt) - 1).toISOString());
    expect(await cp.adminTokens.authenticate(tok.token)).to.deep.equal({
      tokenId: tok.id,
      role: 'rule-author',
    });
    setClock(tok.expiresAt);
    expect(await cp.adminTokens.authenticate(tok.token)).to.equal(undefined);
  });

  it('revokes descendants with their ancestor, transitively, and nothing else', async () => {
    const cp = await open();
    await cp.tenants.create({
      id: 'acme',
      name: 'Acme',
      region: 'eu-west',
      issuers: [
        {
          iss: 'https://ehr.acme.example',
          jwks: (await TestIssuer.create({ iss: 'https://ehr.acme.example' })).publicJwks(),
        },
      ],
      fhirServers: [],
    });
    const op = await issue(cp, { role: 'platform-operator' });
    const ta = await issue(cp, { role: 'tenant-admin', tenant: 'acme', issuedBy: op.id });
    const aud = await issue(cp, { role: 'auditor', tenant: 'acme', issuedBy: ta.id });
    const other = await issue(cp, { role: 'auditor', tenant: 'acme', issuedBy: 'bootstrap' });
    expect((await rowOf(cp, aud.id)).issuedBy).to.equal(ta.id);
    expect((await rowOf(cp, other.id)).issuedBy).to.equal(undefined);
    await cp.adminTokens.revoke(op.id);
    for (const t of [op, ta, aud]) {
      expect(await cp.adminTokens.authenticate(t.token), t.id).to.equal(undefined);
      expect((await rowOf(cp, t.id)).revokedAt, t.id).to.equal(T0);
    }
    expect(await cp.adminTokens.authenticate(other.token)).to.not.equal(undefined);
    // A revoked or unknown issuer issues nothing.
    const err = await rejection(issue(cp, { role: 'auditor', tenant: 'acme', issuedBy: ta.id }));
    expect(err).to.be.instanceOf(AdminAuthError);
    const ghost = await rejection(
      issue(cp, { role: 'rule-author', issuedBy: 'tok_000000000000000000000000' }),
    );
    expect(ghost).to.be.instanceOf(AdminAuthError);
  });

  it('refuses an expired issuer, and caps a child at its issuer expiry', async () => {
    const cp = await open();
    const parent = await issue(cp, { role: 'platform-operator', expiresInDays: 10 });
    const child = await issue(cp, { role: 'rule-author', expiresInDays: 365, issuedBy: parent.id });
    expect(child.expiresAt).to.equal(parent.expiresAt);
    setClock(parent.expiresAt);
    const err = await rejection(issue(cp, { role: 'rule-author', issuedBy: parent.id }));
    expect(err).to.be.instanceOf(AdminAuthError);
  });
}

describe('tenants/ authorize: token:revoke by a tenant-admin', () => {
  const ta = { tokenId: 'tok_a', role: 'tenant-admin' as const, tenant: 'acme' };
  const allowed = (target?: Parameters<typeof authorize>[3], tenant = 'acme') => {
    try {
      authorize(ta, 'token:revoke', tenant, target);
      return true;
    } catch (err) {
      expect(err).to.be.instanceOf(ForbiddenError);
      return false;
    }
  };

  it('allows its auditor tokens and itself; refuses a peer, another tenant, and no target', () => {
    expect(allowed({ tokenId: 'tok_x', role: 'auditor' })).to.equal(true);
    expect(allowed({ tokenId: 'tok_a', role: 'tenant-admin' })).to.equal(true);
    expect(allowed({ tokenId: 'tok_b', role: 'tenant-admin' })).to.equal(false);
    expect(allowed({ tokenId: 'tok_x', role: 'auditor' }, 'other')).to.equal(false);
    expect(allowed(undefined)).to.equal(false);
    // An operator needs no target.
    authorize({ tokenId: 'tok_op', role: 'platform-operator' }, 'token:revoke', 'acme');
  });
});

describe('tenants/ admin token lifetimes', () => {
  let clock: string;
  const setClock = (iso: string) => {
    clock = iso;
  };
  beforeEach(() => {
    clock = T0;
  });

  describe('the repository (check: why a token is refused)', () => {
    let sequelize: Sequelize;
    let repo: ReturnType<typeof createAdminTokenRepository>;
    let models: ReturnType<typeof defineControlPlaneModels>;
    let tail: Promise<unknown>;
    /**
     * One write transaction at a time, as the control plane queues them (':memory:' has one
     * connection): an authentication's `lastUsedAt` write runs in the background meanwhile.
     */
    const writeTx: WriteTx = (fn) => {
      const run = tail.then(() => sequelize.transaction((t) => fn(t)));
      tail = run.catch(() => undefined);
      return run;
    };
    beforeEach(async () => {
      tail = Promise.resolve();
      sequelize = new Sequelize({ dialect: 'sqlite', storage: ':memory:', logging: false });
      models = defineControlPlaneModels(sequelize);
      await sequelize.sync();
      repo = createAdminTokenRepository({
        models,
        now: () => new Date(clock),
        writeTx,
        tenantExists: () => Promise.resolve(true),
      });
    });
    afterEach(async () => {
      await repo.settled();
      await sequelize.close();
    });

    it("caps a tenant's live tokens (revoked and expired ones do not count): a tenant-admin cannot mint tokens without bound", async () => {
      const capped = createAdminTokenRepository({
        models,
        now: () => new Date(clock),
        writeTx,
        tenantExists: () => Promise.resolve(true),
        maxLiveTokensPerTenant: 3,
      });
      const issued = [];
      for (let i = 0; i < 3; i++) {
        issued.push(await capped.issue({ role: 'auditor', tenant: 'acme' }));
      }
      const err = await rejection(capped.issue({ role: 'auditor', tenant: 'acme' }));
      expect(err).to.be.instanceOf(ConflictError);
      expect(err.message).to.include('tenant acme already has 3 live tokens');
      // Another tenant, and the operator's own tokens, are not affected.
      await capped.issue({ role: 'auditor', tenant: 'other' });
      await capped.issue({ role: 'rule-author' });
      await capped.revoke(issued[0]!.id);
      await capped.issue({ role: 'auditor', tenant: 'acme', expiresInDays: 1 });
      setClock(plusDays(T0, 2));
      await capped.issue({ role: 'auditor', tenant: 'acme' });
    });

    it('tells unknown, revoked and expired apart (with the row id only for a stored token)', async () => {
      const checks = async (token: string): Promise<AdminTokenCheck> => repo.check(token);
      expect(await checks('ccds_nope')).to.deep.equal({ refused: { reason: 'unknown' } });
      expect(await checks(oldToken().token)).to.deep.equal({ refused: { reason: 'unknown' } });
      const a = await repo.issue({ role: 'rule-author', expiresInDays: 1 });
      expect(await checks(a.token)).to.deep.equal({
        principal: { tokenId: a.id, role: 'rule-author' },
      });
      setClock(plusDays(T0, 1));
      expect(await checks(a.token)).to.deep.equal({
        refused: { reason: 'expired', tokenId: a.id },
      });
      const b = await repo.issue({ role: 'rule-author' });
      await repo.revoke(b.id);
      expect(await checks(b.token)).to.deep.equal({
        refused: { reason: 'revoked', tokenId: b.id },
      });
    });

    it('checks expiresInDays: whole days from 1 to 365', async () => {
      for (const bad of [0, 366, 2.5, '7', null, Number.NaN, Infinity]) {
        const err = await rejection(repo.issue({ role: 'rule-author', expiresInDays: bad }));
        if (!(err instanceof InvalidInputError)) {
          throw new Error(`${String(bad)}: expected InvalidInputError, got ${err.name}`);
        }
        expect(err.field).to.equal('expiresInDays');
      }
      expect((await repo.issue({ role: 'rule-author', expiresInDays: 365 })).expiresAt).to.equal(
        plusDays(T0, 365),
      );
    });

    it('revokes a descendant even through a token revoked before on its own', async () => {
      const a = await repo.issue({ role: 'platform-operator' });
      const b = await repo.issue({ role: 'platform-operator', issuedBy: a.id });
      const c = await repo.issue({ role: 'rule-author', issuedBy: b.id });
      // As if b had been revoked without its child (a control plane before cascades).
      await sequelize.query(`UPDATE admin_tokens SET revoked_at = '${T0}' WHERE id = '${b.id}'`);
      expect(await repo.authenticate(c.token)).to.not.equal(undefined);
      await repo.revoke(a.id);
      expect(await repo.authenticate(c.token)).to.equal(undefined);
    });
  });

  describe('on SQLite', () => {
    let dir: string;
    let file: string;
    const opened: ControlPlane[] = [];
    const open = async () => {
      const cp = await openControlPlane({ storage: file, now: () => new Date(clock) });
      opened.push(cp);
      return cp;
    };
    beforeEach(() => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-toklife-'));
      file = path.join(dir, 'control.sqlite');
    });
    afterEach(async () => {
      // Authentications write lastUsedAt in the background: let them end before closing.
      await Promise.all(opened.map(controlPlaneWritesDone));
      await Promise.all(opened.splice(0).map((cp) => cp.close()));
      fs.rmSync(dir, { recursive: true, force: true });
    });

    lifetimeBehaviours(open, setClock);

    it('opens a control plane whose admin_tokens predates lifetimes: columns added, old tokens never expire', async () => {
      const old = oldToken();
      await sqliteExec(file, [
        // The table as control planes before issuers and expiries made it.
        'CREATE TABLE IF NOT EXISTS `admin_tokens` (`id` VARCHAR(64) PRIMARY KEY, `role` VARCHAR(32) NOT NULL, `tenant_id` VARCHAR(63), `label` VARCHAR(200), `token_hash` VARCHAR(64) NOT NULL UNIQUE, `created_at` VARCHAR(32) NOT NULL, `revoked_at` VARCHAR(32))',
        `INSERT INTO admin_tokens (id, role, tenant_id, label, token_hash, created_at, revoked_at) VALUES ('${old.id}', 'platform-operator', NULL, 'old', '${old.hash}', '2024-01-01T00:00:00.000Z', NULL)`,
      ]);
      const cp = await open();
      setClock('2099-01-01T00:00:00.000Z');
      expect(await cp.adminTokens.authenticate(old.token)).to.deep.equal({
        tokenId: old.id,
        role: 'platform-operator',
      });
      await controlPlaneWritesDone(cp);
      expect(await rowOf(cp, old.id)).to.deep.equal({
        id: old.id,
        role: 'platform-operator',
        label: 'old',
        createdAt: '2024-01-01T00:00:00.000Z',
        lastUsedAt: '2099-01-01T00:00:00.000Z',
      });
      // The old token issues tokens that do expire, recorded as its children.
      const child = await issue(cp, { role: 'rule-author', issuedBy: old.id });
      expect(child.expiresAt).to.equal(plusDays('2099-01-01T00:00:00.000Z', 90));
      await cp.adminTokens.revoke(old.id);
      expect(await cp.adminTokens.authenticate(child.token)).to.equal(undefined);
      await cp.close();
      opened.splice(0);
      // Opening it again adds nothing more.
      const again = await open();
      expect((await listOf(again)).map((t) => t.id)).to.have.members([old.id, child.id]);
    });
  });

  (PG_URL ? describe : describe.skip)('on PostgreSQL', function () {
    this.timeout(120_000);
    const url = PG_URL ?? '';
    let root: Sequelize;
    let schema: string;
    let n = 0;
    const opened: ControlPlane[] = [];
    const open = async () => {
      const cp = await openControlPlane({ postgresUrl: url, schema, now: () => new Date(clock) });
      opened.push(cp);
      return cp;
    };
    before(() => {
      root = new Sequelize(url, { dialect: 'postgres', logging: false, pool: { max: 2 } });
    });
    after(async () => root.close());
    beforeEach(() => {
      n += 1;
      schema = `toklife_${RUN_ID}_${String(n)}`;
    });
    afterEach(async () => {
      // Authentications write lastUsedAt in the background: let them end before closing.
      await Promise.all(opened.map(controlPlaneWritesDone));
      await Promise.all(opened.splice(0).map((cp) => cp.close()));
      await root.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    });

    lifetimeBehaviours(open, setClock);

    it('opens a schema whose admin_tokens predates lifetimes: columns added, old tokens never expire', async () => {
      const old = oldToken();
      await root.query(`CREATE SCHEMA "${schema}"`);
      await root.query(
        `CREATE TABLE "${schema}".admin_tokens (id VARCHAR(64) COLLATE "C" PRIMARY KEY, role VARCHAR(32) NOT NULL, tenant_id VARCHAR(63) COLLATE "C", label VARCHAR(200), token_hash VARCHAR(64) NOT NULL UNIQUE, created_at VARCHAR(32) COLLATE "C" NOT NULL, revoked_at VARCHAR(32))`,
      );
      await root.query(
        `INSERT INTO "${schema}".admin_tokens (id, role, tenant_id, label, token_hash, created_at, revoked_at) VALUES ('${old.id}', 'platform-operator', NULL, 'old', '${old.hash}', '2024-01-01T00:00:00.000Z', NULL)`,
      );
      // Two replicas opening the old schema at once: one adds the columns, both work.
      const [a, b] = await Promise.all([open(), open()]);
      setClock('2099-01-01T00:00:00.000Z');
      for (const cp of [a, b]) {
        expect(await cp.adminTokens.authenticate(old.token)).to.deep.equal({
          tokenId: old.id,
          role: 'platform-operator',
        });
      }
      const cols = await root.query<{ column_name: string; collation_name: string | null }>(
        `SELECT column_name, collation_name FROM information_schema.columns WHERE table_schema = '${schema}' AND table_name = 'admin_tokens' AND column_name IN ('issued_by', 'expires_at') ORDER BY column_name`,
        { type: QueryTypes.SELECT },
      );
      expect(cols).to.deep.equal([
        { column_name: 'expires_at', collation_name: 'C' },
        { column_name: 'issued_by', collation_name: 'C' },
      ]);
      const child = await issue(a, { role: 'rule-author', issuedBy: old.id });
      await b.adminTokens.revoke(old.id);
      expect(await a.adminTokens.authenticate(child.token)).to.equal(undefined);
      expect((await rowOf(a, old.id)).expiresAt).to.equal(undefined);
    });

    it('control-plane copy carries issuedBy and expiresAt from SQLite, and they still work', async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-toklife-copy-'));
      try {
        const file = path.join(dir, 'control.sqlite');
        const src = await openControlPlane({ storage: file, now: () => new Date(clock) });
        const op = await issue(src, { role: 'platform-operator', expiresInDays: 30 });
        const child = await issue(src, { role: 'rule-author', issuedBy: op.id, expiresInDays: 5 });
        const grandchild = await issue(src, { role: 'rule-author', issuedBy: child.id });
        const before = await listOf(src);
        await src.close();

        await copyControlPlane({ from: file, postgresUrl: url, schema });
        const cp = await open();
        expect(await listOf(cp)).to.deep.equal(before);
        expect((await rowOf(cp, grandchild.id)).issuedBy).to.equal(child.id);
        expect((await rowOf(cp, child.id)).expiresAt).to.equal(plusDays(T0, 5));
        setClock(plusDays(T0, 5));
        expect(await cp.adminTokens.authenticate(child.token)).to.equal(undefined);
        expect(await cp.adminTokens.authenticate(op.token)).to.not.equal(undefined);
        await cp.adminTokens.revoke(op.id);
        expect((await rowOf(cp, grandchild.id)).revokedAt).to.equal(plusDays(T0, 5));
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  });
});
