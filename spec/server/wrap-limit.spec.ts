/**
 * A tenant's data key at its hard wrap limit (AES-GCM invocation limit), through the real app:
 * the hook call is refused with 503 `unavailable` (fail closed, nothing stored), the refusal
 * starts the tenant's automatic rotation, `GET /admin/tenants/{id}/keys` shows the wrap count
 * per version and the limits, and calls succeed again under the new version.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import request from 'supertest';
import { toServiceError } from '../../server/error-handler.ts';
import { WrapLimitError } from '../../tenants/index.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { buildTestApp, PUBLIC_URL } from '../helpers/test-app.ts';
import type { TestApp } from '../helpers/test-app.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const HARD = 2 ** 32 - 2 ** 20;

interface KeysBody {
  primary: number;
  versions: Array<{ version: number; wraps: number; records: number }>;
  wrapLimits: { soft: number; hard: number };
}

describe('server: a data key at its hard wrap limit', function () {
  this.timeout(60_000);
  let dir: string;
  let t: TestApp;
  let issuer: TestIssuer;
  const call = async () =>
    request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set(
        'authorization',
        `Bearer ${await issuer.sign({ aud: `${PUBLIC_URL}/cds-services/tiny-order-sign` })}`,
      )
      .send(warfarinNsaidRequest());
  const keys = async (): Promise<KeysBody> => {
    const res = await request(t.app)
      .get('/admin/tenants/hosp/keys')
      .set('authorization', `Bearer ${t.adminToken}`);
    expect(res.status).to.equal(200);
    return res.body as KeysBody;
  };

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-wrap-'));
    const regions = path.join(dir, 'regions.json');
    fs.writeFileSync(
      regions,
      JSON.stringify({
        regions: [
          {
            id: 'r1',
            jurisdiction: 'US',
            publicUrl: PUBLIC_URL,
            storage: { dataDir: path.join(dir, 'data') },
            backupDir: path.join(dir, 'backups'),
            keyProvider: { kind: 'local-keyring', dir: path.join(dir, 'keys') },
          },
        ],
      }),
    );
    t = await buildTestApp({
      CELLCDS_REGIONS_FILE: regions,
      CELLCDS_REGION: 'r1',
      CELLCDS_SEED_DEMO: 'false',
    });
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    issuer = await t.addTenant('hosp', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
  });
  after(async () => {
    await t.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('maps WrapLimitError to 503 unavailable with its reason in the log detail only', () => {
    const err = toServiceError(new WrapLimitError('hosp', 3, HARD, HARD));
    expect(err).to.include({ status: 503, code: 'unavailable', detail: 'key: wrap_limit' });
    expect(err.message).to.not.include('hosp');
  });

  it('refuses the hook call with 503, rotates the key by itself, and serves again under the new version', async () => {
    expect((await call()).status).to.equal(200);
    const before = await keys();
    expect(before.primary).to.equal(1);
    expect(before.versions).to.have.length(1);
    expect(before.versions[0]).to.include({ version: 1, wraps: 1, records: 1 });
    expect(before.wrapLimits).to.deep.equal({ soft: 2 ** 31, hard: HARD });

    // The version has made as many encryptions as it may (as if it had sealed 2^32 - 2^20).
    const db = new Sequelize({
      dialect: 'sqlite',
      storage: path.join(dir, 'data', 'r1', 'hosp.sqlite'),
      logging: false,
    });
    try {
      await db.query(`UPDATE dek_versions SET wrap_count = ${String(HARD)} WHERE version = 1`);
    } finally {
      await db.close();
    }
    const refused = await call();
    expect(refused.status).to.equal(503);
    expect(refused.body).to.include({ error: 'unavailable' });
    expect(JSON.stringify(refused.body)).to.not.match(/warfarin|Patient/i);

    // The refusal started the tenant's rotation (the provider is up): v2 takes the writes.
    let after = await keys();
    for (let i = 0; i < 200 && after.primary !== 2; i += 1) {
      await new Promise((r) => setTimeout(r, 25));
      after = await keys();
    }
    expect(after.primary).to.equal(2);
    expect(after.versions.find((v) => v.version === 1)?.wraps).to.equal(HARD);
    const ok = await call();
    expect(ok.status).to.equal(200);
    const lines = t.logLines.filter((l) => l.includes('wrap limit'));
    expect(lines.some((l) => l.includes('write refused'))).to.equal(true);
    expect(lines.some((l) => l.includes('rotation started'))).to.equal(true);
    expect(lines.join('\n')).to.not.match(/warfarin|Patient/i);
  });
});
