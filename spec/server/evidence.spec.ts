import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import {
  buildEvidence,
  EvidenceInputError,
  renderEvidenceMarkdown,
  writeEvidence,
} from '../../server/evidence.ts';
import type { EvidenceEvent, EvidenceReport } from '../../server/evidence.ts';
import { loadRegionMatrix } from '../../server/regions.ts';
import type { RegionMatrix } from '../../server/regions.ts';
import { ResidencyError } from '../../tenants/index.ts';
import type { KeyProvider, NewInvocation, RegionStores, Tenant } from '../../tenants/index.ts';
import { anchorsOfFile, controlPlaneChain } from '../../server/audit-anchors.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest, tinyPack } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const PHI_MARKER = 'EVIDENCE-PHI-MARKER';

/** An invocation record whose sealed part carries the PHI marker. */
function invocation(id: string): NewInvocation {
  return {
    id,
    time: new Date(),
    service: 'tiny-patient-view',
    hook: 'patient-view',
    hookInstance: `hi-${id}`,
    pack: { id: 'tiny', version: '1.0.0', hash: 'a'.repeat(64) },
    cardUuids: [`card-${id}`],
    suggestionUuids: [],
    secret: {
      context: { patientId: `${PHI_MARKER}-patient` },
      prefetch: { patient: { resourceType: 'Patient', name: [{ family: PHI_MARKER }] } },
      cards: [{ summary: `${PHI_MARKER} card` }],
      trace: [],
    },
  };
}

/**
 * A real run: the app's admin API and CDS endpoints (admin actions, token issue and revoke,
 * failed logins), the registry's residency refusal, and the real data plane of region `local`
 * (records, a DEK rotation, a KEK rotation, a backup and a restore). The report must list
 * exactly what the run did.
 */
describe('server/ evidence report', function () {
  this.timeout(60_000);
  let t: TestApp;
  let issuer: TestIssuer;
  let matrix: RegionMatrix;
  let provider: KeyProvider;
  let stores: RegionStores;
  let from: Date;
  let to: Date;
  let report: EvidenceReport;
  let auditorTokenId: string;
  let readerTokenId: string;
  let readId: string;

  const admin = () => ({ authorization: `Bearer ${t.adminToken}` });

  before(async () => {
    from = new Date(Date.now() - 1000);
    t = await buildTestApp();
    matrix = loadRegionMatrix(undefined, { dataDir: t.dataDir, publicUrl: PUBLIC_URL });
    const region = matrix.regions[0]!;

    // Admin actions through the admin API.
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    issuer = await t.addTenant('hosp-a', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
    await t.addTenant('hosp-b');
    expect(
      (await request(t.app).post('/admin/tenants/hosp-b/suspend').set(admin())).status,
    ).to.equal(200);
    expect(
      (await request(t.app).post('/admin/tenants/hosp-b/resume').set(admin())).status,
    ).to.equal(200);
    const issued = await request(t.app)
      .post('/admin/tokens')
      .set(admin())
      .send({ role: 'auditor', tenant: 'hosp-a', label: 'external audit' });
    expect(issued.status).to.equal(201);
    auditorTokenId = issued.body.id as string;
    // Before its revocation, the auditor of hosp-a tries hosp-b's tenant: refused, audited.
    expect(
      (
        await request(t.app)
          .get('/admin/tenants/hosp-b')
          .set({ authorization: `Bearer ${issued.body.token as string}` })
      ).status,
    ).to.equal(403);
    expect(
      (await request(t.app).delete(`/admin/tokens/${auditorTokenId}`).set(admin())).status,
    ).to.equal(204);

    // A placement the policy forbids: refused by the registry, which records it.
    try {
      await t.deps.controlPlane.tenants.create(
        {
          id: 'hosp-eu',
          name: 'EU hospital',
          region: 'local',
          issuers: [{ iss: 'https://ehr-eu.example.org', jwks: issuer.publicJwks() }],
          residency: { processingRegions: ['eu-west'] },
        },
        { regions: matrix.regions, actor: 'platform-operator:bootstrap' },
      );
      expect.fail('the placement should be refused');
    } catch (err) {
      expect(err).to.be.instanceOf(ResidencyError);
    }

    // Failed authentication: CDS clients and an operator.
    const url = `${PUBLIC_URL}/cds-services/tiny-patient-view`;
    const call = (auth?: string) => {
      const r = request(t.app).post('/cds-services/tiny-patient-view');
      return (auth ? r.set('authorization', auth) : r).send(patientViewRequest(PHI_MARKER));
    };
    expect((await call()).status).to.equal(401);
    expect((await call('Bearer not-a-jwt')).status).to.equal(401);
    expect(
      (
        await call(
          `Bearer ${await issuer.sign({ aud: url, exp: Math.floor(Date.now() / 1000) - 3600 })}`,
        )
      ).status,
    ).to.equal(401);
    expect(
      (await call(`Bearer ${await issuer.sign({ aud: `${PUBLIC_URL}/cds-services/other` })}`))
        .status,
    ).to.equal(401);
    expect((await call(`Bearer ${await issuer.sign({ aud: url })}`)).status).to.equal(200);
    expect(
      (
        await request(t.app)
          .get('/admin/tenants')
          .set('authorization', 'Bearer wrong-operator-token')
      ).status,
    ).to.equal(401);

    // The app's own data plane of region `local`: records, rotations, backup, restore.
    provider = t.deps.keyProvider;
    stores = t.deps.stores;
    expect(stores.region).to.equal(region.id);
    const store = stores.store('hosp-a');
    await store.saveInvocation(invocation('inv-1'));
    await store.saveInvocation(invocation('inv-2'));
    const job = await store.keys.rotate({ actor: 'platform-operator:bootstrap' });
    expect((await stores.waitForJob(job.id)).status).to.equal('done');
    const kek = await stores.rotateKek({ actor: 'platform-operator:bootstrap' });
    expect((await stores.waitForJob(kek.id)).status).to.equal('done');
    // A restore test, then the next backup. (A restore rewinds the tenant's chain to the
    // snapshot, so the `backup.created` of the restored backup itself is not in it.)
    const backup = await stores.backupTenant('hosp-a', region.backupDir);
    await stores.restoreTenant(backup.path);
    await stores.backupTenant('hosp-a', region.backupDir);
    expect((await store.readInvocation('inv-1')).secret.cards).to.be.an('array');

    // Record access through the admin API: a tenant-admin of hosp-a (issued in the registry, so
    // the token listing above stays the run's own) lists, reads and replays the hook call's record.
    const reader = await t.deps.controlPlane.adminTokens.issue({
      role: 'tenant-admin',
      tenant: 'hosp-a',
    });
    readerTokenId = reader.id;
    const asReader = { authorization: `Bearer ${reader.token}` };
    const listed = await request(t.app).get('/admin/tenants/hosp-a/invocations').set(asReader);
    expect(listed.status).to.equal(200);
    readId = (listed.body.invocations as Array<{ id: string }>).find(
      (i) => !i.id.startsWith('inv-'),
    )!.id;
    expect(
      (await request(t.app).get(`/admin/tenants/hosp-a/invocations/${readId}`).set(asReader))
        .status,
    ).to.equal(200);
    expect(
      (
        await request(t.app)
          .post(`/admin/tenants/hosp-a/invocations/${readId}/replay`)
          .set(asReader)
      ).status,
    ).to.equal(200);
    // A probe for a record that does not exist, as the admin API audits it (a failure).
    await t.deps.controlPlane.audit.record({
      type: 'records.read',
      outcome: 'failure',
      tenant: 'hosp-a',
      actor: `tenant-admin:${reader.id}`,
      detail: { reason: 'not_found', invocationLength: 9 },
    });
    to = new Date(Date.now() + 1000);

    const withStore = async (tenant: Tenant) => (await stores.listTenants()).includes(tenant.id);
    report = await buildEvidence({
      controlPlane: t.deps.controlPlane,
      matrix,
      from,
      to,
      tenantEvents: async (tenant) => {
        if (!(await withStore(tenant))) {
          return [];
        }
        const events = [];
        for (let afterSeq = 0; ;) {
          const page = await stores.store(tenant.id).audit.list({ afterSeq, limit: 1000 });
          if (page.length === 0) {
            return events;
          }
          events.push(...page);
          afterSeq = page.at(-1)!.seq;
        }
      },
      verifyChain: async (tenant) => {
        return (await withStore(tenant)) ? stores.store(tenant.id).audit.verify() : null;
      },
      describeKeys: () => provider.describe(),
      chainHead: async (tenant) =>
        (await withStore(tenant)) ? stores.store(tenant.id).audit.head() : null,
      controlPlaneChain: controlPlaneChain(t.deps.controlPlane.audit),
      actor: 'platform-operator:spec',
    });
  });

  after(async () => t.close());

  const types = (events: readonly EvidenceEvent[]) => events.map((e) => e.type);

  it('states the period, the format and its sources', () => {
    expect(report.format).to.equal('cellcds-evidence/1');
    expect(report.period).to.deep.equal({ from: from.toISOString(), to: to.toISOString() });
    expect(report.sources[0]).to.equal('control-plane audit log');
    expect(report.sources).to.include('tenant audit chains (2 of 2 tenants)');
  });

  it('lists the region matrix and where the keys are held', () => {
    expect(report.regions).to.have.length(1);
    expect(report.regions[0]).to.deep.include({ id: 'local', jurisdiction: 'local', failover: [] });
    expect(report.regions[0]!.data).to.equal(`sqlite ${path.join(t.dataDir, 'local')}/`);
    expect(report.keyProviders).to.have.length(1);
    const kp = report.keyProviders[0]!;
    if ('error' in kp) {
      throw new Error(`key provider not described: ${kp.error}`);
    }
    expect(kp.kind).to.equal('local-keyring');
    expect(kp.primaryKekVersion).to.equal(2);
    expect(kp.keks.map((k) => k.version)).to.deep.equal([1, 2]);
  });

  it('lists tenant placements with their effective residency policy', () => {
    expect(report.tenants.map((p) => p.id)).to.deep.equal(['hosp-a', 'hosp-b']);
    expect(report.tenants[0]).to.deep.include({
      homeRegion: 'local',
      jurisdiction: 'local',
      status: 'active',
      policySource: 'default',
      failover: null,
      problems: [],
    });
    expect(report.tenants[0]!.policy).to.deep.equal({
      processingRegions: ['local'],
      backupRegions: ['local'],
      dr: { mode: 'none' },
    });
  });

  it('lists the key rotations the run performed, with their actors, and counts unwraps', () => {
    const keyTypes = types(report.keyHistory.events);
    expect(keyTypes).to.include.members([
      'key.create',
      'key.rotate',
      'key.rewrap',
      'key.kek.rewrap',
    ]);
    expect(keyTypes).not.to.include('key.unwrap');
    const rotate = report.keyHistory.events.find((e) => e.type === 'key.rotate')!;
    expect(rotate).to.deep.include({
      tenant: 'hosp-a',
      actor: 'platform-operator:bootstrap',
      source: 'tenant:hosp-a',
      outcome: 'success',
    });
    expect(rotate.detail).to.deep.include({ from: 1, to: 2, emergency: false });
    expect(report.keyHistory.unwraps.failure).to.equal(0);
    const times = report.keyHistory.events.map((e) => e.at);
    expect(times).to.deep.equal([...times].sort());
  });

  it('lists admin access and role changes: token issue and revoke, admin actions, residency refusals', () => {
    const tokens = report.adminActivity.tokens;
    expect(types(tokens)).to.deep.equal(['admin.token.issue', 'admin.token.revoke']);
    expect(tokens[0]!.detail).to.deep.include({ tokenId: auditorTokenId, role: 'auditor' });
    expect(tokens[0]).to.deep.include({ tenant: 'hosp-a', actor: 'platform-operator:bootstrap' });
    expect(tokens[1]!.detail).to.deep.equal({ tokenId: auditorTokenId });
    expect(types(report.adminActivity.actions)).to.deep.equal([
      'admin.pack.upload',
      'admin.tenant.create',
      'admin.tenant.subscriptions',
      'admin.tenant.create',
      'admin.tenant.suspend',
      'admin.tenant.resume',
    ]);
    const [refusal] = report.adminActivity.residency;
    expect(refusal).to.deep.include({
      type: 'residency.refused',
      outcome: 'failure',
      tenant: 'hosp-eu',
      actor: 'platform-operator:bootstrap',
    });
    expect(refusal!.detail).to.deep.include({
      action: 'create',
      reasons: 'unknown_region,home_not_processing',
    });
  });

  it('counts failed authentication by reason, for clients and operators', () => {
    expect(report.failedAuth.clients).to.deep.equal({
      total: 4,
      byReason: { bad_aud: 1, expired: 1, malformed: 1, missing: 1 },
    });
    expect(report.failedAuth.operators).to.deep.equal({
      total: 1,
      byReason: { 'unknown token': 1 },
    });
    expect(report.failedAuth.total).to.equal(5);
  });

  it('counts refused admin accesses (403) by the action refused, apart from the admin actions', () => {
    expect(report.adminActivity.forbidden).to.deep.equal({
      total: 1,
      byReason: { 'tenant:read': 1 },
    });
    expect(types(report.adminActivity.actions)).to.not.include('admin.forbidden');
  });

  it('reports each audit chain verification; a tenant without a store is not a failure', () => {
    expect(report.auditChains).to.not.equal(null);
    const chains = report.auditChains!;
    expect(chains).to.deep.include({ checked: 1, failed: 0, absent: 1 });
    const a = chains.results.find((c) => c.tenant === 'hosp-a')!;
    expect(a).to.deep.include({ region: 'local', ok: true });
    expect(a.count).to.be.greaterThan(5);
    expect(chains.results.find((c) => c.tenant === 'hosp-b')).to.deep.equal({
      tenant: 'hosp-b',
      region: 'local',
      ok: true,
      absent: true,
    });
  });

  it('reports a broken chain, and one that could not be verified, as failures', async () => {
    const failing = await buildEvidence({
      controlPlane: t.deps.controlPlane,
      matrix,
      from,
      to,
      verifyChain: (tenant) =>
        tenant.id === 'hosp-a'
          ? Promise.resolve({ ok: false, count: 7, firstBadSeq: 4, problem: 'hash_mismatch' })
          : Promise.reject(new Error(`store of ${tenant.id} at ${PHI_MARKER} unreadable`)),
    });
    expect(failing.auditChains).to.deep.equal({
      checked: 2,
      failed: 2,
      absent: 0,
      results: [
        {
          tenant: 'hosp-a',
          region: 'local',
          ok: false,
          count: 7,
          firstBadSeq: 4,
          problem: 'hash_mismatch',
        },
        // The error's message is not copied (it could say anything): its type is.
        { tenant: 'hosp-b', region: 'local', ok: false, error: 'Error' },
      ],
    });
    const md = renderEvidenceMarkdown(failing);
    expect(md).to.include('| hosp-a | local | FAILED | 7 | 4 | hash_mismatch |');
    expect(md).not.to.include(PHI_MARKER);
  });

  it('lists record reads and replays: who (token id, role), when, which invocation, counts per actor', () => {
    const actor = `tenant-admin:${readerTokenId}`;
    expect(report.recordAccess.byActor).to.deep.equal([
      {
        tenant: 'hosp-a',
        actor,
        role: 'tenant-admin',
        tokenId: readerTokenId,
        read: 2,
        replay: 1,
        list: 1,
        failed: 1,
      },
    ]);
    expect(report.recordAccess.total).to.equal(5);
    expect(report.recordAccess.notListed).to.equal(0);
    expect(
      report.recordAccess.events.map((e) => [e.type, e.actor, e.detail?.invocation]),
    ).to.deep.equal([
      ['records.list', actor, undefined],
      ['records.read', actor, readId],
      ['records.read', actor, readId],
      ['records.replay', actor, readId],
      ['records.read', actor, undefined],
    ]);
    expect(report.recordAccess.events.at(-1)).to.deep.include({ outcome: 'failure' });
    // The tenant's own chain: the spec's direct read (no reader named) and the two API reads.
    expect(report.recordAccess.tenantChainReads).to.deep.equal([
      { tenant: 'hosp-a', actor: '-', success: 1, failure: 0 },
      { tenant: 'hosp-a', actor, success: 2, failure: 0 },
    ]);
    const md = renderEvidenceMarkdown(report);
    expect(md).to.include(
      `| hosp-a | ${actor} | tenant-admin | ${readerTokenId} | 2 | 1 | 1 | 1 |`,
    );
    expect(md).to.match(
      new RegExp(`\\| hosp-a \\| records\\.read \\| success \\| ${actor} \\| ${readId} \\|`),
    );
  });

  it('records its own production (who, which period) before reading, and lists it', async () => {
    const [run] = await t.deps.controlPlane.audit.list({ type: 'evidence.report' });
    expect(run).to.deep.include({ outcome: 'success', actor: 'platform-operator:spec' });
    expect(run!.detail).to.deep.equal({ from: from.toISOString(), to: to.toISOString() });
    expect(report.auditActivity.map((e) => e.type)).to.include('evidence.report');
  });

  it("gives each chain's head, an anchor that `audit verify --anchor <report>` reads", async () => {
    const cpHead = await controlPlaneChain(t.deps.controlPlane.audit).head();
    const aHead = await stores.store('hosp-a').audit.head();
    expect(report.anchors.map((a) => a.chain)).to.deep.equal(['control-plane', 'tenant:hosp-a']);
    expect(report.anchors[1]).to.deep.include(aHead);
    // The control-plane head covers the report's own event (recorded first).
    const run = (await t.deps.controlPlane.audit.list({ type: 'evidence.report' }))[0]!;
    expect(report.anchors[0]!.seq).to.be.at.least(run.seq);
    expect(report.anchors[0]!.seq).to.be.at.most(cpHead.seq);
    expect(report.controlPlaneChain).to.deep.include({ ok: true });
    const json = JSON.stringify(report);
    expect(anchorsOfFile(json, 'tenant:hosp-a', 'report.json')).to.deep.equal([aHead]);
    expect(anchorsOfFile(json, 'control-plane', 'report.json')).to.deep.equal([
      { seq: report.anchors[0]!.seq, hash: report.anchors[0]!.hash },
    ]);
    expect(() => anchorsOfFile(json, 'tenant:hosp-b', 'report.json')).to.throw(
      /report\.json holds no anchor of the tenant:hosp-b chain/,
    );
    const md = renderEvidenceMarkdown(report);
    expect(md).to.include(`| tenant:hosp-a | ${aHead.seq}:${aHead.hash} |`);
    expect(md).to.include('--anchor');
  });

  it('gives the last backup and restore per tenant', () => {
    const a = report.backups.find((b) => b.tenant === 'hosp-a')!;
    expect(a.lastBackup).to.deep.include({
      type: 'backup.created',
      outcome: 'success',
      source: 'tenant:hosp-a',
    });
    expect(a.lastRestore).to.deep.include({ type: 'backup.restored', outcome: 'success' });
    expect(a.lastBackup!.at >= a.lastRestore!.at).to.equal(true);
    expect(report.backups.find((b) => b.tenant === 'hosp-b')).to.deep.equal({
      tenant: 'hosp-b',
      lastBackup: null,
      lastRestore: null,
    });
  });

  it('holds no PHI and no secrets', () => {
    const text = JSON.stringify(report);
    expect(text).not.to.include(PHI_MARKER);
    expect(text).not.to.include(t.adminToken);
    expect(text).not.to.include('wrong-operator-token');
  });

  it('only lists events of the period', async () => {
    const earlier = await buildEvidence({
      controlPlane: t.deps.controlPlane,
      matrix,
      from: new Date(from.getTime() - 3_600_000),
      to: from,
      tenantEvents: async () => stores.store('hosp-a').audit.list({ limit: 1000 }),
    });
    expect(earlier.keyHistory.events).to.deep.equal([]);
    expect(earlier.adminActivity.tokens).to.deep.equal([]);
    expect(earlier.failedAuth.total).to.equal(0);
    expect(earlier.auditChains).to.equal(null);
    expect(earlier.backups.every((b) => b.lastBackup === null)).to.equal(true);
    await expectRejection(
      buildEvidence({ controlPlane: t.deps.controlPlane, matrix, from: to, to: from }),
      /from must be before to/,
    );
    await expectRejection(
      buildEvidence({ controlPlane: t.deps.controlPlane, matrix, from: 'last tuesday', to }),
      /from must be an ISO 8601/,
    );
  });

  it('renders a readable Markdown page with every section, escaping table cells', () => {
    const md = renderEvidenceMarkdown(report);
    if (process.env.CELLCDS_SPEC_PRINT_EVIDENCE) {
      process.stdout.write(md);
    }
    for (const heading of [
      '# cellcds evidence report',
      '## Regions',
      '## Key providers',
      '## Tenant placements',
      '## Key rotation history',
      '## Admin access and role changes',
      '### Operator tokens',
      '### Admin actions',
      '### Residency decisions',
      '## Failed authentication',
      '## Record access',
      '### Each access',
      "### Decrypts in the tenants' own audit chains",
      '## Audit chain verification',
      '## Audit chain heads (anchors)',
      '### Audit verifications, exported heads and evidence reports',
      '## Backups and restore tests',
    ]) {
      expect(md.split('\n'), heading).to.include(heading);
    }
    expect(md).to.match(
      /\| hosp-a \| active \| local \| local \| local \| local \| none \| default \| - \| none \|/,
    );
    expect(md).to.include('| CDS client | expired | 1 |');
    expect(md).to.include('1 chain(s) checked, 0 failed, 1 tenant(s) without a store.');
    expect(md).to.include('| hosp-b | local | no store | - | - | - |');
    expect(md).not.to.include(PHI_MARKER);
    expect(md).to.match(
      /\| [^|]+ \| hosp-a \| key\.rotate \| success \| platform-operator:bootstrap \| from=1, to=2, /,
    );
    expect(md).to.match(
      /\| hosp-a \| [^|]+ \(backup\.created, success\) \| [^|]+ \(backup\.restored, success\) \|/,
    );
    // Every table row has as many cells as its header.
    for (const block of md.split('\n\n')) {
      const rows = block.split('\n').filter((l) => l.startsWith('| '));
      const widths = new Set(rows.map((r) => r.split(/(?<!\\)\|/).length));
      expect(widths.size, block).to.be.at.most(1);
    }

    const tricky: EvidenceReport = structuredClone(report);
    tricky.adminActivity.residency[0]!.detail = { note: 'a|b\nc' };
    expect(renderEvidenceMarkdown(tricky)).to.include('note=a\\|b c');
  });

  it('writes the JSON and the page, readable only by the owner', () => {
    const out = writeEvidence(report, path.join(t.dataDir, 'evidence'));
    expect(JSON.parse(fs.readFileSync(out.json, 'utf8'))).to.deep.equal(report);
    expect(fs.readFileSync(out.markdown, 'utf8')).to.equal(renderEvidenceMarkdown(report));
    for (const file of [out.json, out.markdown]) {
      expect(fs.statSync(file).mode & 0o777).to.equal(0o600);
    }
    expect(path.basename(out.json)).to.match(/^evidence-\d{8}T\d{9}Z_\d{8}T\d{9}Z\.json$/);
  });
});

async function expectRejection(promise: Promise<unknown>, message: RegExp): Promise<void> {
  try {
    await promise;
  } catch (err) {
    expect(err).to.be.instanceOf(EvidenceInputError);
    expect((err as Error).message).to.match(message);
    return;
  }
  throw new Error('expected a rejection');
}
