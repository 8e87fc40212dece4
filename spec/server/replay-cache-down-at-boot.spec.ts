/**
 * Redis unreachable when the service starts (CELLCDS_REDIS_URL on a closed port): the service
 * boots and fails closed, and on-call's alert (docs/operations.md: `warn` with
 * `replayCache: "down"`) fires for it as for Redis going down later. It used to log only a boot
 * `warn` without that field (the first state seen was not logged).
 */
import { expect } from 'chai';
import request from 'supertest';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { freePort } from '../helpers/processes.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

interface LogLine {
  level: string;
  msg: string;
  replayCache?: string;
}

const DOWN_LINE =
  'the replay cache (Redis) does not answer: CDS client tokens are refused with 503 until it does';

describe('replay cache (Redis) unreachable at boot', function () {
  this.timeout(60_000);
  let t: TestApp;
  let ehr: TestIssuer;

  before(async () => {
    // A port nothing listens on (just released by the OS).
    const closed = await freePort();
    t = await buildTestApp({ CELLCDS_REDIS_URL: `redis://127.0.0.1:${String(closed)}/11` });
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    ehr = await t.addTenant('redis-boot-down', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
    });
  });
  after(async () => t.close());

  it('logs the documented warn line with replayCache "down" once, and fails closed', async () => {
    const lines = t.logLines.map((l) => JSON.parse(l) as LogLine);
    const down = lines.filter((l) => l.replayCache === 'down');
    expect(down, JSON.stringify(lines.filter((l) => l.level !== 'info'))).to.have.length(1);
    expect(down[0]).to.include({ level: 'warn', msg: DOWN_LINE });
    // No second, field-less line about the same fact.
    expect(lines.filter((l) => /does not answer/.test(l.msg))).to.have.length(1);

    const ready = await request(t.app).get('/readyz');
    expect(ready.status).to.equal(503);
    expect(ready.body.replayCache).to.equal('down');
    expect(ready.body.reasons.replayCache.code).to.equal('unreachable');
    const res = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set(
        'authorization',
        `Bearer ${await ehr.sign({ aud: `${PUBLIC_URL}/cds-services/tiny-order-sign` })}`,
      )
      .send(warfarinNsaidRequest());
    expect(res.status).to.equal(503);
    expect(res.headers['retry-after']).to.equal('5');
    // Still one line: refused tokens log only their own `request refused` lines.
    const after = t.logLines.map((l) => JSON.parse(l) as LogLine);
    expect(after.filter((l) => l.replayCache === 'down')).to.have.length(1);
  });
});
