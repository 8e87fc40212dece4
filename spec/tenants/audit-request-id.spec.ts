/**
 * The control-plane audit log filtered by request id (`list({ requestId })`): the id every
 * refusal names (`X-Request-Id`) is kept in an event's `detail.requestId`. Exact matches only
 * (not a prefix, not another case, not another detail key that ends in it, not a value that
 * merely contains it), on SQLite and, with CELLCDS_TEST_PG_URL, on PostgreSQL; a value that is
 * no request id is refused naming the field.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import { InvalidInputError, openControlPlane } from '../../tenants/index.ts';
import type { AuditEvent, AuditQuery, ControlPlane } from '../../tenants/index.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;
const RUN_ID = crypto.randomBytes(4).toString('hex');
const RID = '6f1c2b9e-0a4d-4e7b-9c3f-1d2e3f4a5b6c';

/** `list` with a request id (a field the admin service passes on; see AuditQuery). */
const byRequestId = (cp: ControlPlane, requestId: unknown, rest: AuditQuery = {}) =>
  cp.audit.list({ ...rest, requestId } as AuditQuery);

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

function behaves(open: () => Promise<ControlPlane>): void {
  let cp: ControlPlane;
  beforeEach(async () => {
    cp = await open();
    const events: Array<Omit<AuditEvent, 'outcome'>> = [
      { type: 'auth.failure', detail: { reason: 'bad_signature', requestId: RID } },
      { type: 'admin.forbidden', tenant: 'hosp-b', detail: { reason: 'x', requestId: RID } },
      // Not this request: another id, a longer one, another case, another key, a value with it.
      { type: 'auth.failure', detail: { reason: 'expired', requestId: crypto.randomUUID() } },
      { type: 'auth.failure', detail: { reason: 'expired', requestId: `${RID}-2` } },
      { type: 'auth.failure', detail: { reason: 'expired', requestId: RID.toUpperCase() } },
      { type: 'auth.failure', detail: { reason: 'expired', xrequestId: RID } },
      { type: 'auth.failure', detail: { reason: `"requestId":"${RID}"` } },
      { type: 'admin.tenant.create', tenant: 'hosp-b' },
    ];
    for (const e of events) {
      await cp.audit.record({ outcome: 'failure', ...e });
    }
  });
  afterEach(async () => cp.close());

  it('lists exactly the events of that request id, in seq order', async () => {
    const found = await byRequestId(cp, RID);
    expect(found.map((e) => [e.seq, e.type])).to.deep.equal([
      [1, 'auth.failure'],
      [2, 'admin.forbidden'],
    ]);
    expect(found.every((e) => e.detail?.requestId === RID)).to.equal(true);
  });

  it('combines with the tenant and type filters', async () => {
    expect((await byRequestId(cp, RID, { tenant: 'hosp-b' })).map((e) => e.seq)).to.deep.equal([2]);
    expect((await byRequestId(cp, RID, { tenant: 'hosp-a' })).length).to.equal(0);
    expect((await byRequestId(cp, RID, { type: 'auth.failure' })).map((e) => e.seq)).to.deep.equal([
      1,
    ]);
  });

  it('finds nothing for an unknown request id', async () => {
    expect(await byRequestId(cp, crypto.randomUUID())).to.deep.equal([]);
  });

  const bad: Array<[string, unknown]> = [
    ['an empty string', ''],
    ['a list (two requestId parameters)', [RID, RID]],
    ['a LIKE wildcard', '%'],
    ['an underscore', '6f1c2b9e_0a4d'],
    ['a quote', `${RID}"`],
    ['a backslash', 'a\\b'],
    ['a space', 'a b'],
    ['more than 64 characters', 'a'.repeat(65)],
    ['a number', 42],
  ];
  for (const [name, value] of bad) {
    it(`refuses ${name} naming the field requestId`, async () => {
      const err = await rejection(byRequestId(cp, value));
      if (!(err instanceof InvalidInputError)) {
        throw new Error(`expected InvalidInputError, got ${err.name}: ${err.message}`);
      }
      expect(err.field).to.equal('requestId');
    });
  }
}

describe('tenants/ audit list by request id (SQLite)', () => {
  let dir: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-audit-rid-'));
  });
  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });
  let n = 0;
  behaves(() => openControlPlane({ storage: path.join(dir, `cp-${String(++n)}.sqlite`) }));
});

(PG_URL ? describe : describe.skip)('tenants/ audit list by request id (PostgreSQL)', () => {
  const url = PG_URL ?? '';
  let root: Sequelize;
  let n = 0;
  let schema = '';
  before(() => {
    root = new Sequelize(url, { dialect: 'postgres', logging: false, pool: { max: 1 } });
  });
  after(async () => root.close());
  behaves(() => {
    schema = `cellcds_auditrid_${RUN_ID}_${String(++n)}`;
    return openControlPlane({ postgresUrl: url, schema });
  });
  // After the control plane of the test is closed (hooks run in the order they are added).
  afterEach(async () => {
    await root.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  });
});
