/**
 * Restore refuses a backup whose snapshot was tampered with or truncated. Whoever edits it without
 * the key provider cannot make its manifest verify (manifest_signature; see
 * backup-authentication.spec.ts). Behind that, the staged copy is checked all the same, even
 * for a manifest re-authenticated after the edit (as only the provider's holder could): the
 * snapshot's audit chain must verify end to end, and the manifest's counts, audit head and DEK
 * versions must be the snapshot's own.
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { BackupError } from '../../../tenants/data-plane.ts';
import type { BackupResult } from '../../../tenants/data-plane.ts';
import { copyDir, openSnapshot, patchManifest, resign } from './backup-tamper.ts';
import type { EventRow, Snapshot } from './backup-tamper.ts';
import { asInstance, forEachBackend, invocation, makeEnv, rejection } from './helpers.ts';
import type { Env } from './helpers.ts';

async function refusal(p: Promise<unknown>): Promise<BackupError> {
  return asInstance(await rejection(p), BackupError);
}

forEachBackend('tenants/ data plane: restore refuses tampered or truncated backups', (backend) => {
  let env: Env;
  let backup: BackupResult;
  let n = 0;
  beforeEach(async () => {
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    for (let i = 1; i <= 5; i += 1) {
      await s.saveInvocation(invocation(`inv-${i}`));
    }
    await s.saveFeedback(
      [{ card: 'card-inv-1', outcome: 'accepted', outcomeTimestamp: '2025-01-01T13:00:00Z' }],
      { service: 'med-safety' },
    );
    await s.readInvocation('inv-2', { actor: 'auditor' });
    for (const type of ['test.one', 'test.two']) {
      await s.audit.append({ type, outcome: 'success' });
    }
    backup = await env.stores.backupTenant('acme', env.backupDir);
    await s.saveInvocation(invocation('inv-after-backup'));
  });
  afterEach(async () => {
    await env.close();
  });

  const tampered = (): string => {
    n += 1;
    return copyDir(backup.path, path.join(env.dir, `tampered-${String(n)}`));
  };

  /** The live store is exactly what it was before the refused restore. */
  async function expectLiveUntouched(): Promise<void> {
    const s = env.stores.store('acme');
    expect((await s.listInvocations()).map((r) => r.id).sort()).to.deep.equal(
      ['inv-1', 'inv-2', 'inv-3', 'inv-4', 'inv-5', 'inv-after-backup'].sort(),
    );
    expect(await s.audit.verify()).to.include({ ok: true });
    expect((await s.audit.list()).map((e) => e.type)).to.not.include('backup.restored');
    if (backend === 'sqlite') {
      const left = fs
        .readdirSync(path.join(env.dataDir, env.region))
        .filter((f) => f.includes('.restore-'));
      expect(left, 'staged copies left behind').to.deep.equal([]);
    }
  }

  it('returns the counts of the restored store and restores a backup nobody touched', async () => {
    const result = await env.stores.restoreTenant(backup.path, { tenant: 'acme' });
    const s = env.stores.store('acme');
    const restored = (await s.audit.list({ limit: 10_000 })).find(
      (e) => e.type === 'backup.restored',
    );
    expect(result.counts).to.deep.equal({
      invocations: (await s.listInvocations()).length,
      feedback: 1,
      auditEvents: (restored?.seq ?? 0) - 1, // the snapshot's events come before it
    });
    expect(result.counts.invocations).to.equal(5);
    expect(await s.audit.verify()).to.include({ ok: true });
  });

  it('refuses a backup with records and the last audit events deleted, the audit head re-anchored and the checksums recomputed', async () => {
    const dir = tampered();
    const snap = await openSnapshot(backend, dir);
    const events = await snap.events();
    const read = events.find((e) => e.type === 'record.read');
    expect(read, 'the auditor read is in the snapshot').to.not.equal(undefined);
    const kept = events.filter((e) => e.seq < (read?.seq ?? 0));
    const last = kept[kept.length - 1];
    await snap.deleteInvocations(['inv-4', 'inv-5']);
    await snap.deleteEvents(events.filter((e) => e.seq >= (read?.seq ?? 0)).map((e) => e.seq));
    await snap.setHead(last?.seq ?? 0, last?.hash ?? '');
    await snap.save();

    expect((await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }))).reason).to.equal(
      'manifest_signature',
    );
    await resign(env.provider, dir);
    const err = await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }));
    expect(err.reason).to.equal('manifest_mismatch');
    expect(err.message).to.match(/invocations 5 in the manifest, 3 in the snapshot/);
    await expectLiveUntouched();
  });

  const manifestEdits: Array<[string, (m: Record<string, unknown>) => void]> = [
    ['one invocation more', (m) => ((m.counts as { invocations: number }).invocations += 1)],
    ['one feedback item fewer', (m) => ((m.counts as { feedback: number }).feedback -= 1)],
    ['one audit event fewer', (m) => ((m.counts as { auditEvents: number }).auditEvents -= 1)],
    ['an earlier audit head', (m) => ((m.auditHead as { seq: number }).seq -= 1)],
    ['another audit head hash', (m) => ((m.auditHead as { hash: string }).hash = 'f'.repeat(64))],
    [
      'an extra DEK version',
      (m) => (m.dekVersions as unknown[]).push({ version: 9, status: 'active', kekVersion: 1 }),
    ],
    [
      'another DEK status',
      (m) => ((m.dekVersions as Array<{ status: string }>)[0]!.status = 'retired'),
    ],
  ];
  for (const [name, edit] of manifestEdits) {
    it(`refuses a manifest that does not describe its snapshot: ${name} (manifest_mismatch, also when re-authenticated)`, async () => {
      const dir = tampered();
      patchManifest(dir, edit);
      expect((await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }))).reason).to.equal(
        'manifest_signature',
      );
      await resign(env.provider, dir);
      const err = await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }));
      expect(err.reason).to.equal('manifest_mismatch');
      await expectLiveUntouched();
    });
  }

  const chainEdits: Array<[string, string, (snap: Snapshot, events: EventRow[]) => Promise<void>]> =
    [
      [
        'an edited event',
        'hash_mismatch',
        (snap, events) => snap.setEventActor(events[1]?.seq ?? 2, 'someone'),
      ],
      [
        'a deleted event in the middle',
        'seq_gap',
        (snap, events) => snap.deleteEvents([events[1]?.seq ?? 2]),
      ],
      [
        'an audit head that names another hash',
        'anchor_mismatch',
        async (snap, events) => {
          const last = events[events.length - 1];
          await snap.setHead(last?.seq ?? 0, 'e'.repeat(64));
        },
      ],
    ];
  for (const [name, problem, edit] of chainEdits) {
    it(`refuses a snapshot whose audit chain is broken by ${name}, checksums recomputed (audit_chain)`, async () => {
      const dir = tampered();
      const snap = await openSnapshot(backend, dir);
      await edit(snap, await snap.events());
      await snap.save();
      // The manifest's checksums were recomputed: its MAC no longer verifies, and that is
      // checked before the snapshot is staged.
      expect((await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }))).reason).to.equal(
        'manifest_signature',
      );
      await resign(env.provider, dir);
      const err = await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }));
      expect(err.reason).to.equal('audit_chain');
      expect(err.message, err.message).to.include(problem);
      await expectLiveUntouched();
    });
  }
});
