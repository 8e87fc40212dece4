import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { ConflictError, InvalidInputError, NotFoundError } from '../../../tenants/index.ts';
import { KeyUnavailableError, RecordOpenError } from '../../../tenants/data-plane.ts';
import type { FeedbackInput } from '../../../tenants/data-plane.ts';
import {
  asInstance,
  filesContaining,
  flipCiphertextByte,
  forEachBackend,
  invocation,
  makeEnv,
  rejection,
} from './helpers.ts';
import type { Env } from './helpers.ts';

async function openFailure(p: Promise<unknown>): Promise<RecordOpenError> {
  return asInstance(await rejection(p), RecordOpenError);
}

forEachBackend('tenants/ data plane: tenant store', (backend) => {
  let env: Env;
  beforeEach(async () => {
    env = await makeEnv(backend);
  });
  afterEach(async () => {
    await env.close();
  });

  describe('invocation records', () => {
    it('saves metadata in clear and the secret sealed, and reads it back decrypted', async () => {
      const s = env.stores.store('acme');
      const saved = await s.saveInvocation(invocation('inv-1'));
      expect(saved).to.deep.include({
        id: 'inv-1',
        hook: 'order-sign',
        keyVersion: 1,
        cardUuids: ['card-inv-1'],
      });
      const rec = await s.readInvocation('inv-1', { actor: 'token-7' });
      expect(rec.secret).to.deep.equal(invocation('inv-1').secret);
      expect(rec.pack).to.deep.equal({
        id: 'medication-safety',
        version: '1.2.0',
        hash: 'a'.repeat(64),
      });
      expect(rec.time).to.equal('2025-01-01T12:00:01.000Z');
      expect(await s.findCard('card-inv-1')).to.equal('inv-1');
      expect(await s.findCard('card-unknown')).to.equal(undefined);
      const events = await s.audit.list();
      expect(events.map((e) => e.type)).to.include.members(['key.create', 'record.read']);
      const read = events.find((e) => e.type === 'record.read');
      expect(read).to.deep.include({ actor: 'token-7', outcome: 'success' });
      expect(read?.detail).to.deep.equal({ invocation: 'inv-1', feedback: 0 });
    });

    it('lists metadata by time window and hook, ascending, with a limit', async () => {
      const s = env.stores.store('acme');
      for (const i of [3, 1, 2, 4]) {
        await s.saveInvocation(
          invocation(`inv-${i}`, 'PHI', i === 4 ? { hook: 'patient-view' } : {}),
        );
      }
      expect((await s.listInvocations()).map((r) => r.id)).to.deep.equal([
        'inv-1',
        'inv-2',
        'inv-3',
        'inv-4',
      ]);
      const window = await s.listInvocations({
        from: '2025-01-01T12:00:02Z',
        to: '2025-01-01T12:00:04Z',
      });
      expect(window.map((r) => r.id)).to.deep.equal(['inv-2', 'inv-3']);
      expect((await s.listInvocations({ hook: 'patient-view' })).map((r) => r.id)).to.deep.equal([
        'inv-4',
      ]);
      expect(await s.listInvocations({ limit: 1 })).to.have.length(1);
      expect(JSON.stringify(await s.listInvocations())).to.not.include('PHI');
    });

    const bad: Array<[string, Record<string, unknown>, string]> = [
      ['an id with a pipe', { id: 'a|b' }, 'id'],
      ['an id with a path', { id: '../x' }, 'id'],
      ['a bad time', { time: 'yesterday' }, 'time'],
      ['a repeated card uuid', { cardUuids: ['c1', 'c1'] }, 'cardUuids'],
      ['a missing pack', { pack: undefined }, 'pack'],
      ['a control character in hookInstance', { hookInstance: 'a\nb' }, 'hookInstance'],
      [
        'a secret that is not JSON',
        { secret: { context: 1n, prefetch: {}, cards: [], trace: [] } },
        'secret',
      ],
      ['both a secret and its JSON', { secretJson: '{"context":{}}' }, 'secret'],
      [
        'secretJson that is not the secret',
        { secret: undefined, secretJson: '{"patient":"x"}' },
        'secretJson',
      ],
      [
        'secretJson without cards and trace',
        { secret: undefined, secretJson: '{"context":{},"prefetch":{}}' },
        'secretJson',
      ],
    ];
    for (const [name, patch, field] of bad) {
      it(`refuses ${name} with InvalidInputError(${field}) and stores nothing`, async () => {
        const s = env.stores.store('acme');
        const err = await rejection(s.saveInvocation({ ...invocation('inv-1'), ...patch }));
        expect(asInstance(err, InvalidInputError).field).to.equal(field);
        expect(await s.listInvocations()).to.deep.equal([]);
      });
    }

    it('refuses a second record with the same id or a card uuid already sent', async () => {
      const s = env.stores.store('acme');
      await s.saveInvocation(invocation('inv-1'));
      expect(await rejection(s.saveInvocation(invocation('inv-1')))).to.be.instanceOf(
        ConflictError,
      );
      const clash = invocation('inv-2', 'PHI', { cardUuids: ['card-inv-1'] });
      expect(await rejection(s.saveInvocation(clash))).to.be.instanceOf(ConflictError);
      expect(await s.listInvocations()).to.have.length(1);
    });

    // Concurrent writes share batches (one statement on SQLite, one transaction with a
    // multi-row INSERT per table on PostgreSQL): a duplicate in a batch must fail alone, and
    // every other caller must still get its own durable record.
    it('writes concurrent records in batches where only a duplicate fails', async () => {
      const s = env.stores.store('acme');
      await s.saveInvocation(invocation('inv-0'));
      const ids = Array.from({ length: 40 }, (_, i) => `inv-${String(i + 1)}`);
      const outcomes = await Promise.allSettled([
        ...ids.map((id) => s.saveInvocation(invocation(id, `PHI ${id}`))),
        s.saveInvocation(invocation('inv-0')), // the same id again
        s.saveInvocation(invocation('inv-dup', 'PHI', { cardUuids: ['card-inv-7'] })),
        s.saveInvocation(invocation('inv-5')), // twice in the same burst
      ]);
      const failed = outcomes.flatMap((o, i) => (o.status === 'rejected' ? [i] : []));
      expect(failed).to.have.length(3);
      for (const i of failed) {
        const o = outcomes[i];
        expect(o?.status === 'rejected' ? o.reason : undefined).to.be.instanceOf(ConflictError);
      }
      // Of the two inv-5 writes, exactly one won; neither of the two clashing ones is stored.
      expect(failed).to.include.members([40, 41]);
      const stored = (await s.listInvocations({ limit: 1000 })).map((r) => r.id);
      expect(stored).to.have.members(['inv-0', ...ids]);
      for (const id of ['inv-1', 'inv-7', 'inv-40']) {
        expect((await s.readInvocation(id)).secret).to.deep.equal(
          invocation(id, `PHI ${id}`).secret,
        );
      }
      expect(await s.findCard('card-inv-7')).to.equal('inv-7');
    });

    // SQLite writes a batch as one statement; a TEMP trigger on the writer connection links the
    // card uuids. It must link every card (several per record, none for a record without
    // cards), live on every new writer connection (after a restart too), and never be stored in
    // the file, where backups, other connections or an older cellcds would meet it.
    it('links every card uuid of a batch, also after a restart; the store file holds no such trigger', async () => {
      const s = env.stores.store('acme');
      await Promise.all([
        s.saveInvocation(invocation('inv-1', 'PHI', { cardUuids: ['c-1a', 'c-1b', 'c-1c'] })),
        s.saveInvocation(invocation('inv-2', 'PHI', { cardUuids: [] })),
        s.saveInvocation(invocation('inv-3')),
      ]);
      await env.stores.close();
      const fresh = await env.reopen();
      const again = fresh.store('acme');
      await again.saveInvocation(invocation('inv-4', 'PHI', { cardUuids: ['c-4a', 'c-4b'] }));
      for (const [card, id] of [
        ['c-1a', 'inv-1'],
        ['c-1b', 'inv-1'],
        ['c-1c', 'inv-1'],
        ['card-inv-3', 'inv-3'],
        ['c-4a', 'inv-4'],
        ['c-4b', 'inv-4'],
      ]) {
        expect(await again.findCard(card ?? ''), card).to.equal(id);
      }
      const db = await env.raw('acme');
      try {
        const links = await db.query<{ n: number }>(
          `SELECT COUNT(*) AS n FROM ${db.t('invocation_cards')}`,
        );
        expect(Number(links[0]?.n)).to.equal(6);
        if (backend === 'sqlite') {
          expect(
            await db.query(`SELECT name FROM sqlite_master WHERE type = 'trigger'`),
          ).to.have.deep.members([
            { name: 'audit_events_no_update' },
            { name: 'audit_events_no_delete' },
            { name: 'invocations_sealed_drops_head' },
            { name: 'feedback_sealed_drops_head' },
            // The DEK wrap counters (wrap-limit.ts), in the store on purpose.
            ...[
              'invocations',
              'invocations_reseal',
              'feedback',
              'feedback_reseal',
              'invocation_heads',
              'invocation_heads_rewrap',
              'feedback_heads',
              'feedback_heads_rewrap',
            ].map((t) => ({ name: `${t}_counts_wrap` })),
          ]);
        }
      } finally {
        await db.close();
      }
      await fresh.close();
    });

    it('stores a secret given as JSON text (the hook path) exactly like the object', async () => {
      const s = env.stores.store('acme');
      const { secret, ...rest } = invocation('inv-1');
      await s.saveInvocation({ ...rest, secretJson: JSON.stringify(secret) });
      expect((await s.readInvocation('inv-1')).secret).to.deep.equal(secret);
    });

    it('reads a missing record as NotFoundError', async () => {
      expect(await rejection(env.stores.store('acme').readInvocation('nope'))).to.be.instanceOf(
        NotFoundError,
      );
    });
  });

  describe('feedback', () => {
    const fb = (card: string, extra: Partial<FeedbackInput> = {}): FeedbackInput => ({
      card,
      outcome: 'overridden',
      overrideReason: {
        reason: { code: 'c', system: 'http://s' },
        userComment: 'FB-SECRET comment',
      },
      outcomeTimestamp: '2025-01-01T12:05:00Z',
      ...extra,
    });

    it('links feedback to its card, seals it, and stores repeats once', async () => {
      const s = env.stores.store('acme');
      await s.saveInvocation(invocation('inv-1'));
      const first = await s.saveFeedback([fb('card-inv-1')], { service: 'med-safety' });
      expect(first).to.include({ stored: 1, duplicates: 0 });
      const again = await s.saveFeedback(
        [fb('card-inv-1', { outcomeTimestamp: '2025-01-01T12:05:00.000Z' }), fb('card-inv-1')],
        { service: 'med-safety' },
      );
      expect(again).to.include({ stored: 0, duplicates: 2 });
      expect(again.ids).to.deep.equal([first.ids[0], first.ids[0]]);
      const accepted = await s.saveFeedback(
        [fb('card-inv-1', { outcome: 'accepted', acceptedSuggestions: [{ id: 'sugg-inv-1' }] })],
        { service: 'med-safety' },
      );
      expect(accepted.stored).to.equal(1);
      const rec = await s.readInvocation('inv-1');
      expect(rec.feedback.map((f) => f.outcome)).to.deep.equal(['overridden', 'accepted']);
      expect(rec.feedback[0]?.item.overrideReason?.userComment).to.equal('FB-SECRET comment');
      expect(rec.feedback[0]).to.include({
        invocationId: 'inv-1',
        card: 'card-inv-1',
        service: 'med-safety',
      });
    });

    it('refuses, all or nothing, a card never sent to this tenant or by this service (404)', async () => {
      const a = env.stores.store('acme');
      const b = env.stores.store('beta');
      await a.saveInvocation(invocation('inv-1'));
      await b.saveInvocation(invocation('inv-9'));
      for (const [items, service] of [
        [[fb('card-inv-1'), fb('card-never-sent')], 'med-safety'],
        [[fb('card-inv-9')], 'med-safety'],
        [[fb('card-inv-1')], 'another-service'],
      ] as const) {
        const err = await rejection(a.saveFeedback(items, { service }));
        expect(err).to.be.instanceOf(NotFoundError);
      }
      expect((await a.readInvocation('inv-1')).feedback).to.deep.equal([]);
    });

    it('refuses malformed feedback naming the field', async () => {
      const s = env.stores.store('acme');
      const err = await rejection(
        s.saveFeedback([{ ...fb('c'), outcome: 'maybe' } as never], { service: 'x' }),
      );
      expect(asInstance(err, InvalidInputError).field).to.equal('feedback[0].outcome');
      expect(await rejection(s.saveFeedback([], { service: 'x' }))).to.be.instanceOf(
        InvalidInputError,
      );
    });
  });

  it('keeps every PHI column on disk as ciphertext (store, WAL, backup)', async () => {
    const marker = `PHIMARK${Date.now().toString(36)}`;
    const s = env.stores.store('acme');
    for (let i = 1; i <= 20; i += 1) {
      await s.saveInvocation(invocation(`inv-${i}`, marker));
    }
    await s.saveFeedback(
      [
        {
          card: 'card-inv-1',
          outcome: 'overridden',
          overrideReason: { userComment: `${marker}-comment` },
          outcomeTimestamp: '2025-01-01T13:00:00Z',
        },
      ],
      { service: 'med-safety' },
    );
    expect((await s.readInvocation('inv-1')).secret.context).to.deep.equal({
      patientId: `${marker}-patient`,
      userId: 'Practitioner/1',
    });
    const backup = await env.stores.backupTenant('acme', env.backupDir);
    expect(filesContaining(backup.path, marker)).to.deep.equal([]);
    if (backend === 'sqlite') {
      const file = path.join(env.dataDir, env.region, 'acme.sqlite');
      expect(fs.existsSync(`${file}-wal`)).to.equal(true);
      for (const f of [file, `${file}-wal`, `${file}-shm`]) {
        expect(fs.statSync(f).mode & 0o777, f).to.equal(0o600);
      }
      expect(fs.statSync(path.dirname(file)).mode & 0o777).to.equal(0o700);
      expect(fs.statSync(`${file}-wal`).size).to.be.greaterThan(0);
      expect(filesContaining(env.dataDir, marker)).to.deep.equal([]);
      expect(filesContaining(env.keyDir, marker)).to.deep.equal([]);
      // The file is in WAL mode (header bytes 18/19 = 2).
      const header = fs.readFileSync(file).subarray(18, 20);
      expect([...header]).to.deep.equal([2, 2]);
    } else {
      const raw = await env.raw('acme');
      for (const table of [
        'invocations',
        'feedback',
        'invocation_cards',
        'audit_events',
        'dek_versions',
        'meta',
        'jobs',
      ]) {
        const rows = await raw.query<{ j: string }>(
          `SELECT row_to_json(x)::text AS j FROM ${raw.t(table)} x`,
        );
        expect(rows.map((r) => r.j).join('\n')).to.not.include(marker);
      }
    }
  });

  describe('tampering and cross-tenant copies fail loudly', () => {
    beforeEach(async () => {
      for (const t of ['acme', 'beta']) {
        const s = env.stores.store(t);
        await s.saveInvocation(invocation(`${t}-1`, t));
        await s.saveInvocation(invocation(`${t}-2`, t));
      }
    });

    const sealedOf = async (tenant: string, id: string): Promise<string | Buffer> => {
      const raw = await env.raw(tenant);
      const rows = await raw.query<{ sealed: string | Buffer }>(
        `SELECT sealed FROM ${raw.t('invocations')} WHERE id = :id`,
        { id },
      );
      return rows[0]!.sealed;
    };
    const setSealed = async (
      tenant: string,
      id: string,
      sealed: string | Buffer,
    ): Promise<void> => {
      const raw = await env.raw(tenant);
      await raw.exec(`UPDATE ${raw.t('invocations')} SET sealed = :sealed WHERE id = :id`, {
        sealed,
        id,
      });
    };

    it('a flipped byte of the stored ciphertext', async () => {
      await setSealed('acme', 'acme-1', flipCiphertextByte(await sealedOf('acme', 'acme-1'), 3, 7));
      const err = await openFailure(env.stores.store('acme').readInvocation('acme-1'));
      expect(err.reason).to.equal('authentication_failed');
      const audit = await env.stores.store('acme').audit.list();
      expect(audit.at(-1)).to.deep.include({ type: 'record.read', outcome: 'failure' });
      expect((await env.stores.store('acme').readInvocation('acme-2')).id).to.equal('acme-2');
    });

    it('a row swapped between two records of the same tenant', async () => {
      await setSealed('acme', 'acme-1', await sealedOf('acme', 'acme-2'));
      expect(
        (await openFailure(env.stores.store('acme').readInvocation('acme-1'))).reason,
      ).to.equal('authentication_failed');
    });

    it('a row copied from another tenant', async () => {
      await setSealed('beta', 'beta-1', await sealedOf('acme', 'acme-1'));
      expect(
        (await openFailure(env.stores.store('beta').readInvocation('beta-1'))).reason,
      ).to.equal('authentication_failed');
    });

    it("another tenant's wrapped DEK copied into the store", async () => {
      const rawA = await env.raw('acme');
      const rawB = await env.raw('beta');
      const [deka] = await rawA.query<{ wrapped: string }>(
        `SELECT wrapped FROM ${rawA.t('dek_versions')} WHERE version = 1`,
      );
      await rawB.exec(`UPDATE ${rawB.t('dek_versions')} SET wrapped = :w WHERE version = 1`, {
        w: deka!.wrapped,
      });
      const fresh = await env.reopen(); // a process without cached DEKs
      const err = await openFailure(fresh.store('beta').readInvocation('beta-1'));
      expect(err.reason).to.equal('key_unavailable');
      expect(asInstance(err.cause, KeyUnavailableError).reason).to.equal('unwrap_failed');
      // The same forged key also refuses to seal new records.
      expect(
        await rejection(fresh.store('beta').saveInvocation(invocation('beta-3'))),
      ).to.be.instanceOf(KeyUnavailableError);
    });

    it('a store file or schema that belongs to another tenant', async () => {
      if (backend === 'postgres') {
        const raw = await env.raw('beta');
        await raw.exec(`UPDATE ${raw.t('meta')} SET value = 'acme' WHERE key = 'tenant'`);
      } else {
        const dir = path.join(env.dataDir, env.region);
        await env.stores.close();
        fs.copyFileSync(path.join(dir, 'acme.sqlite'), path.join(dir, 'gamma.sqlite'));
      }
      const fresh = await env.reopen();
      const target = backend === 'postgres' ? 'beta' : 'gamma';
      expect(await rejection(fresh.store(target).listInvocations())).to.be.instanceOf(
        ConflictError,
      );
    });
  });

  describe('audit chain', () => {
    const seed = async (tenant: string) => {
      const s = env.stores.store(tenant);
      for (let i = 1; i <= 5; i += 1) {
        await s.audit.append({
          type: 'admin.action',
          outcome: 'success',
          actor: 'op',
          detail: { n: i },
        });
      }
      return s;
    };

    it('appends linked events and verifies the intact chain against its head anchor', async () => {
      const s = await seed('acme');
      const events = await s.audit.list();
      for (let i = 1; i < events.length; i += 1) {
        expect(events[i]!.prevHash).to.equal(events[i - 1]!.hash);
        expect(events[i]!.seq).to.equal(events[i - 1]!.seq + 1);
      }
      expect(await s.audit.head()).to.deep.equal({
        seq: events.at(-1)!.seq,
        hash: events.at(-1)!.hash,
      });
      expect(await s.audit.verify()).to.deep.equal({ ok: true, count: events.length });
    });

    it('refuses UPDATE and DELETE on the chain table (append-only)', async () => {
      await seed('acme');
      const raw = await env.raw('acme');
      expect(
        await rejection(raw.exec(`UPDATE ${raw.t('audit_events')} SET actor = 'x'`)),
      ).to.be.instanceOf(Error);
      expect(await rejection(raw.exec(`DELETE FROM ${raw.t('audit_events')}`))).to.be.instanceOf(
        Error,
      );
    });

    it('refuses malformed events', async () => {
      const s = env.stores.store('acme');
      for (const e of [
        { type: 'Bad Type', outcome: 'success' },
        { type: 'a.b', outcome: 'maybe' },
        { type: 'a.b', outcome: 'success', detail: { x: { nested: 1 } } },
      ]) {
        expect(await rejection(s.audit.append(e as never))).to.be.instanceOf(InvalidInputError);
      }
    });

    const tampering: Array<
      [
        string,
        (raw: Awaited<ReturnType<Env['raw']>>, last: number) => Promise<void>,
        'first' | 'last' | number,
        string,
      ]
    > = [
      [
        'an edited event',
        (raw) => raw.exec(`UPDATE ${raw.t('audit_events')} SET detail = '{"n":42}' WHERE seq = 4`),
        4,
        'hash_mismatch',
      ],
      [
        'a deleted middle event',
        (raw) => raw.exec(`DELETE FROM ${raw.t('audit_events')} WHERE seq = 4`),
        4,
        'seq_gap',
      ],
      [
        'a deleted last event',
        (raw, last) => raw.exec(`DELETE FROM ${raw.t('audit_events')} WHERE seq = ${last}`),
        'last',
        'anchor_mismatch',
      ],
      [
        'two reordered events',
        async (raw) => {
          await raw.exec(`UPDATE ${raw.t('audit_events')} SET seq = -1 WHERE seq = 3`);
          await raw.exec(`UPDATE ${raw.t('audit_events')} SET seq = 3 WHERE seq = 4`);
          await raw.exec(`UPDATE ${raw.t('audit_events')} SET seq = 4 WHERE seq = -1`);
        },
        3,
        'broken_link',
      ],
    ];
    for (const [name, tamper, firstBad, problem] of tampering) {
      it(`verify catches ${name}`, async () => {
        const s = await seed('acme');
        const last = (await s.audit.head()).seq;
        const raw = await env.raw('acme');
        await raw.dropAuditTriggers();
        await tamper(raw, last);
        const result = await s.audit.verify();
        expect(result.ok).to.equal(false);
        expect(result.problem).to.equal(problem);
        expect(result.firstBadSeq).to.equal(firstBad === 'last' ? last : firstBad);
      });
    }
  });

  // Writes run on a long-lived writer connection next to the reader: closing both at once let
  // each see the other and skip the final checkpoint, leaving the data in -wal files (a copy
  // or backup of the .sqlite file alone then lacked it).
  const sqliteOnly = backend === 'sqlite' ? it : undefined;
  sqliteOnly?.('closes stores with their data in the store files, no WAL left behind', async () => {
    const dir = path.join(env.dataDir, env.region);
    let stores = env.stores;
    for (let round = 0; round < 6; round += 1) {
      for (const t of ['acme', 'beta', 'gamma']) {
        await stores.store(t).saveInvocation(invocation(`${t}-${String(round)}`, t));
      }
      await stores.close();
      // Besides the stores, only the region's keyring binding (no tenant data, no WAL).
      expect(fs.readdirSync(dir).filter((f) => !f.endsWith('.sqlite'))).to.deep.equal([
        '.keyring-binding.json',
      ]);
      stores = await env.reopen();
    }
    expect(await stores.store('beta').listInvocations()).to.have.length(6);
  });

  // An evicted handle parks its unwrapped DEKs: reopening the store must not unwrap (and
  // audit) them again on every call, but a quiesced tenant (deprovisioned) keeps none.
  it('reopens an evicted store without unwrapping its DEK again; a deprovision drops it', async () => {
    const stores = await env.reopen({ maxOpen: 1 });
    const unwraps = async (t: string) =>
      (await stores.store(t).audit.list()).filter((e) => e.type === 'key.unwrap').length;
    for (let round = 0; round < 3; round += 1) {
      for (const t of ['park-a', 'park-b']) {
        await stores.store(t).saveInvocation(invocation(`${t}-${String(round)}`, t));
      }
    }
    // Created in this process: no unwrap at all (the new DEK is cached when it is made).
    expect(await unwraps('park-a')).to.equal(0);
    const fresh = await env.reopen({ maxOpen: 1 }); // another process: one unwrap each
    for (let round = 0; round < 3; round += 1) {
      for (const t of ['park-a', 'park-b']) {
        expect((await fresh.store(t).readInvocation(`${t}-${String(round)}`)).id).to.equal(
          `${t}-${String(round)}`,
        );
      }
    }
    const unwrapsIn = async (t: string) =>
      (await fresh.store(t).audit.list()).filter((e) => e.type === 'key.unwrap').length;
    expect(await unwrapsIn('park-a')).to.equal(1);
    expect(await unwrapsIn('park-b')).to.equal(1);
    await fresh.deprovisionTenant('park-b');
    expect(await rejection(fresh.store('park-b').readInvocation('park-b-0'))).to.be.instanceOf(
      Error,
    );
  });

  it('keeps at most maxOpen handles (LRU) with 10 tenants, all usable', async () => {
    const stores = await env.reopen({ maxOpen: 3 });
    const tenants = Array.from({ length: 10 }, (_, i) => `lru-${i}`);
    const openSqliteFiles = () =>
      fs
        .readdirSync('/proc/self/fd')
        .map((fd) => {
          try {
            return fs.readlinkSync(path.join('/proc/self/fd', fd));
          } catch {
            return '';
          }
        })
        .filter(
          (target) =>
            target.startsWith(path.join(env.dataDir, env.region)) && target.endsWith('.sqlite'),
        );
    for (const [round, t] of [...tenants, ...tenants].entries()) {
      const s = stores.store(t);
      if (round < tenants.length) {
        await s.saveInvocation(invocation(`${t}-1`, t));
      } else {
        expect((await s.readInvocation(`${t}-1`)).secret.trace).to.deep.equal([
          { rule: 'r1', matched: `${t}-trace` },
        ]);
      }
      expect(stores.stats().open).to.be.at.most(3);
      if (backend === 'sqlite') {
        // Evicted handles close asynchronously (a WAL checkpoint each, longer on a loaded
        // machine): their files must be closed soon after, not at once.
        const deadline = Date.now() + 5000;
        while (new Set(openSqliteFiles()).size > 3 && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 5));
        }
        expect(new Set(openSqliteFiles()).size).to.be.at.most(3);
      }
    }
    // Concurrent use of all ten: every call succeeds; afterwards the bound holds again.
    const results = await Promise.all(tenants.map((t) => stores.store(t).readInvocation(`${t}-1`)));
    expect(results.map((r) => r.id)).to.deep.equal(tenants.map((t) => `${t}-1`));
    expect(stores.stats().open).to.be.at.most(3);
    expect(await stores.listTenants()).to.include.members(tenants);
  });
});
