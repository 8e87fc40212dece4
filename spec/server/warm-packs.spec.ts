/**
 * Before serving, the subscribed pack versions are compiled in the evaluation workers: a worker
 * that compiles a pack when a call arrives spends that call's budget on it (on a busy host the
 * first calls after a restart came back with every rule skipped).
 */
import { expect } from 'chai';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import type { CompiledPack } from '../../rules/index.ts';

function pack(version: string): Record<string, unknown> {
  return {
    id: 'warm',
    version,
    title: 'Warm pack',
    publisher: 'cellcds specs',
    description: 'A pack to warm.',
    services: [{ id: 'warm-svc', hook: 'patient-view', description: 'A service.' }],
    rules: [
      {
        id: 'always',
        service: 'warm-svc',
        when: 'true',
        card: { summary: `version ${version}`, indicator: 'info', source: { label: 'specs' } },
      },
    ],
  };
}

describe('warming the subscribed packs before serving', () => {
  let t: TestApp;

  before(async () => {
    t = await buildTestApp();
    for (const version of ['1.0.0', '1.1.0', '2.0.0', '3.0.0']) {
      const res = await t.uploadPack(pack(version));
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
    }
    await t.addTenant('pinned', { subscriptions: [{ pack: 'warm', version: '1.0.0' }] });
    await t.addTenant('with-canary', { subscriptions: [{ pack: 'warm', version: '1.0.0' }] });
    await t.deps.controlPlane.tenants.setSubscriptions('with-canary', [
      { pack: 'warm', version: '1.0.0', canary: { version: '1.1.0', percent: 10 } },
    ]);
    await t.addTenant('suspended', { subscriptions: [{ pack: 'warm', version: '3.0.0' }] });
    await t.deps.controlPlane.tenants.update('suspended', { status: 'suspended' });
  });
  after(async () => t.close());

  it('warms each pinned and canary version of the active tenants once, and no other', async () => {
    const warmedHere: CompiledPack[] = [];
    const warmed = await t.deps.directory.warmSubscribedPacks({
      warm: (compiled) => warmedHere.push(compiled),
    });
    expect([...warmed].sort()).to.deep.equal(['warm@1.0.0', 'warm@1.1.0']);
    expect(warmedHere.map((p) => p.version).sort()).to.deep.equal(['1.0.0', '1.1.0']);
    // 2.0.0 is in the catalog but nobody's; 3.0.0 only a suspended tenant's.
  });

  it('hands the compiled packs to the real evaluator without waiting for a call', async () => {
    const warmed = await t.deps.directory.warmSubscribedPacks(t.deps.evaluator);
    expect(warmed).to.have.length(2);
  });
});
