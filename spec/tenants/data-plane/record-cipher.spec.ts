import crypto from 'node:crypto';
import { expect } from 'chai';
import fc from 'fast-check';
import {
  KeyUnavailableError,
  RecordOpenError,
  generateDataKey,
  openRecord,
  recordAad,
  sealLegacyRecord,
  sealRecord,
  sealRecordAs,
  sealRecordBinary,
} from '../../../tenants/data-plane.ts';
import {
  BINARY_HEAD_BYTES,
  HEAD_READ_LENGTH,
  envelopeHead,
  rewrapHead,
  withHead,
} from '../../../tenants/data-plane/record-cipher.ts';
import type { Envelope, RecordAddress, SealingKey } from '../../../tenants/data-plane.ts';
import { asInstance, flipCiphertextByte, rejection } from './helpers.ts';

const A: RecordAddress = { tenant: 'acme', table: 'invocations', recordId: 'inv-1' };
const keyA: SealingKey = { version: 1, key: generateDataKey() };
const keyB: SealingKey = { version: 1, key: generateDataKey() };
const lookup = (k: SealingKey) => (v: number) =>
  v === k.version
    ? Promise.resolve(k.key)
    : Promise.reject(new KeyUnavailableError('dek_destroyed', 'no such version'));

async function openError(
  envelope: Envelope,
  addr: RecordAddress,
  key: SealingKey,
): Promise<RecordOpenError> {
  return asInstance(await rejection(openRecord(envelope, addr, lookup(key))), RecordOpenError);
}

describe('tenants/ data plane: record cipher (AES-256-GCM)', () => {
  it('round-trips any bytes (property) and never repeats an IV', async () => {
    const ivs = new Set<string>();
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 2048 }), async (bytes) => {
        const env = sealRecord(keyA, A, Buffer.from(bytes));
        const iv = env.split('.')[3] ?? '';
        expect(ivs.has(iv)).to.equal(false);
        ivs.add(iv);
        const back = await openRecord(env, A, lookup(keyA));
        return back.equals(Buffer.from(bytes));
      }),
    );
  });

  it('names its key version, the wrapped record key, a 96-bit IV and a 128-bit tag in the envelope', () => {
    const env = sealRecord({ version: 7, key: keyA.key }, A, Buffer.from('x'));
    const [prefix, version, wrap, iv, , tag] = env.split('.');
    expect(prefix).to.equal('ccds3');
    expect(version).to.equal('7');
    // wrapIv (12) | record key (32) | wrapTag (16)
    expect(Buffer.from(wrap ?? '', 'base64url')).to.have.length(60);
    expect(Buffer.from(iv ?? '', 'base64url')).to.have.length(12);
    expect(Buffer.from(tag ?? '', 'base64url')).to.have.length(16);
  });

  it('fails loudly on any flipped byte of IV, ciphertext or tag (text and binary forms)', async () => {
    for (const seal of [sealRecord, sealRecordBinary]) {
      const env = seal(keyA, A, Buffer.from('{"patient":"PHI-MARKER"}'));
      for (const segment of [1, 2, 3, 4]) {
        for (const index of [0, 5, 11]) {
          const err = await openError(flipCiphertextByte(env, segment, index), A, keyA);
          expect(err.reason).to.equal('authentication_failed');
        }
      }
    }
  });

  const moved: Array<[string, RecordAddress]> = [
    ['another tenant', { ...A, tenant: 'other' }],
    ['another table', { ...A, table: 'feedback' }],
    ['another record', { ...A, recordId: 'inv-2' }],
  ];
  for (const [name, addr] of moved) {
    it(`fails to open under ${name} (AAD binds tenant|table|recordId), in both forms`, async () => {
      for (const seal of [sealRecord, sealRecordBinary]) {
        const env = seal(keyA, A, Buffer.from('secret'));
        expect((await openError(env, addr, keyA)).reason).to.equal('authentication_failed');
      }
    });
  }

  it("fails to open with another tenant's DEK", async () => {
    const env = sealRecord(keyA, A, Buffer.from('secret'));
    expect((await openError(env, A, keyB)).reason).to.equal('authentication_failed');
  });

  it('fails with key_unavailable when the version is destroyed, never returning null', async () => {
    const env = sealRecord({ version: 2, key: keyA.key }, A, Buffer.from('secret'));
    const err = await openError(env, A, keyA);
    expect(err.reason).to.equal('key_unavailable');
    expect(err.cause).to.be.instanceOf(KeyUnavailableError);
  });

  const malformed = [
    '',
    'ccds1',
    'ccds2.1.a.b.c',
    'ccds1.0.AAAA.AAAA.AAAA',
    'ccds1.1.!!.AA.AA',
    'ccds1.1.AAAA.AAAA.AAAA',
    'ccds3.1.AAAA.AAAA.AAAA',
    `ccds3.1.${'A'.repeat(80)}.AAAA.AAAA.AAAA`,
    `ccds3.1.${'A'.repeat(80)}.${'A'.repeat(16)}.AAAA`,
    `ccds1.1.${'A'.repeat(80)}.${'A'.repeat(16)}.AAAA.${'A'.repeat(22)}`,
  ];
  for (const env of malformed) {
    it(`refuses a malformed envelope ${JSON.stringify(env)}`, async () => {
      expect((await openError(env, A, keyA)).reason).to.equal('malformed');
    });
  }

  it('refuses address parts that would make the AAD ambiguous', () => {
    expect(() => recordAad({ tenant: 'a|b', table: 't', recordId: 'r' })).to.throw(TypeError);
    expect(() => recordAad({ tenant: 'a', table: 't', recordId: '' })).to.throw(TypeError);
  });

  it('keeps error messages free of plaintext and key material', async () => {
    const env = sealRecord(keyA, A, Buffer.from('PHI-MARKER-xyz'));
    const err = await openError(flipCiphertextByte(env), A, keyA);
    expect(err.message).to.not.include('PHI-MARKER');
    expect(err.message).to.not.include(keyA.key.export().toString('base64url'));
    expect(crypto.getCiphers()).to.include('aes-256-gcm');
  });

  describe('binary form (what SQLite stores keep)', () => {
    it('round-trips any bytes (property), is 97 bytes longer than the plaintext', async () => {
      await fc.assert(
        fc.asyncProperty(fc.uint8Array({ maxLength: 2048 }), async (bytes) => {
          const env = sealRecordBinary(keyA, A, Buffer.from(bytes));
          expect(env.length).to.equal(bytes.length + 5 + 4 + 60 + 12 + 16);
          const back = await openRecord(env, A, lookup(keyA));
          return back.equals(Buffer.from(bytes));
        }),
      );
    });

    it('starts with "ccds" 0x03 and names its key version (uint32, big-endian)', () => {
      const env = sealRecordBinary({ version: 258, key: keyA.key }, A, Buffer.from('x'));
      expect(env.subarray(0, 5)).to.deep.equal(Buffer.from([0x63, 0x63, 0x64, 0x73, 0x03]));
      expect(env.readUInt32BE(5)).to.equal(258);
    });

    it('never repeats an IV', () => {
      const ivs = new Set<string>();
      for (let i = 0; i < 2000; i++) {
        ivs.add(sealRecordBinary(keyA, A, Buffer.from('x')).subarray(69, 81).toString('hex'));
      }
      expect(ivs.size).to.equal(2000);
    });

    it('a changed version field points at another key: key_unavailable or authentication_failed', async () => {
      const env = sealRecordBinary(keyA, A, Buffer.from('secret'));
      env.writeUInt32BE(2, 5);
      expect((await openError(env, A, keyA)).reason).to.equal('key_unavailable');
      const other = sealRecordBinary({ version: 2, key: keyB.key }, A, Buffer.from('secret'));
      other.writeUInt32BE(1, 5);
      expect((await openError(other, A, keyA)).reason).to.equal('authentication_failed');
    });

    const good = () => sealRecordBinary(keyA, A, Buffer.from('secret'));
    const broken: Array<[string, () => Uint8Array]> = [
      ['empty', () => new Uint8Array(0)],
      ['shorter than header and tag', () => good().subarray(0, 36)],
      [
        'another format number',
        () => Buffer.concat([Buffer.from('ccds'), Buffer.from([4]), good().subarray(5)]),
      ],
      ['a head alone', () => good().subarray(0, 69)],
      ['the text form as bytes', () => Buffer.from(sealRecord(keyA, A, Buffer.from('secret')))],
      [
        'version 0',
        () => {
          const b = good();
          b.writeUInt32BE(0, 5);
          return b;
        },
      ],
      [
        'version above 999999999',
        () => {
          const b = good();
          b.writeUInt32BE(1_000_000_000, 5);
          return b;
        },
      ],
    ];
    for (const [name, make] of broken) {
      it(`refuses a malformed binary envelope: ${name}`, async () => {
        expect((await openError(make(), A, keyA)).reason).to.equal('malformed');
      });
    }

    it('opens a Uint8Array view into a larger buffer (what a driver may return)', async () => {
      const env = sealRecordBinary(keyA, A, Buffer.from('secret'));
      const big = new Uint8Array(env.length + 10);
      big.set(env, 7);
      const view = big.subarray(7, 7 + env.length);
      expect((await openRecord(view, A, lookup(keyA))).toString()).to.equal('secret');
    });

    it('sealRecordAs seals in the form asked for; both forms open with the same key', async () => {
      const text = sealRecordAs('text', keyA, A, Buffer.from('same'));
      const binary = sealRecordAs('binary', keyA, A, Buffer.from('same'));
      expect(typeof text).to.equal('string');
      expect(Buffer.isBuffer(binary)).to.equal(true);
      for (const env of [text, binary]) {
        expect((await openRecord(env, A, lookup(keyA))).toString()).to.equal('same');
      }
    });

    it('refuses to seal under a version the envelope cannot name', () => {
      for (const version of [0, -1, 1.5, 1_000_000_000]) {
        expect(() => sealRecordBinary({ version, key: keyA.key }, A, Buffer.from('x'))).to.throw(
          TypeError,
        );
      }
    });
  });
  describe('record keys and heads (what a scheduled rotation moves)', () => {
    const keyV2: SealingKey = { version: 2, key: generateDataKey() };
    const both = (k1: SealingKey, k2: SealingKey) => (v: number) =>
      v === k1.version
        ? Promise.resolve(k1.key)
        : v === k2.version
          ? Promise.resolve(k2.key)
          : Promise.reject(new KeyUnavailableError('dek_destroyed', 'no such version'));

    it('seals every record under its own record key: same plaintext, different wrap and body', () => {
      for (const seal of [sealRecord, sealRecordBinary]) {
        const a = seal(keyA, A, Buffer.from('same'));
        const b = seal(keyA, A, Buffer.from('same'));
        const head = (e: Envelope) => envelopeHead(e, A)!.head;
        expect(head(a)).to.not.deep.equal(head(b));
        expect(typeof a === 'string' ? a.split('.')[4] : a.subarray(81)).to.not.deep.equal(
          typeof b === 'string' ? b.split('.')[4] : b.subarray(81),
        );
      }
    });

    it('reads the head from the envelope or from its first HEAD_READ_LENGTH bytes alike', () => {
      for (const seal of [sealRecord, sealRecordBinary]) {
        const env = seal({ version: 123_456_789, key: keyA.key }, A, Buffer.from('x'.repeat(500)));
        const whole = envelopeHead(env, A)!;
        const prefix = envelopeHead(env.slice(0, HEAD_READ_LENGTH), A)!;
        expect(whole.version).to.equal(123_456_789);
        expect(prefix).to.deep.equal(whole);
        expect(whole.head.length).to.equal(typeof env === 'string' ? 96 : BINARY_HEAD_BYTES);
      }
    });

    it('has no head in the older forms (sealed directly under the DEK)', () => {
      for (const form of ['text', 'binary'] as const) {
        expect(envelopeHead(sealLegacyRecord(form, keyA, A, Buffer.from('x')), A)).to.equal(
          undefined,
        );
      }
    });

    it('re-wraps a head to another DEK version: the body is untouched and opens only under the new version', async () => {
      for (const seal of [sealRecord, sealRecordBinary]) {
        const env = seal(keyA, A, Buffer.from('PHI-MARKER'));
        const moved = rewrapHead(envelopeHead(env, A)!.head, A, keyA, keyV2);
        expect(envelopeHead(moved, A)!.version).to.equal(2);
        const next = withHead(env, moved, A);
        expect(next.length).to.equal(env.length);
        const body = (e: Envelope) =>
          typeof e === 'string' ? e.split('.').slice(3) : e.subarray(69);
        expect(body(next)).to.deep.equal(body(env));
        expect((await openRecord(next, A, both(keyA, keyV2))).toString()).to.equal('PHI-MARKER');
        // Under the old DEK with the new version's number: the wrap does not open.
        expect((await openError(next, A, { version: 2, key: keyA.key })).reason).to.equal(
          'authentication_failed',
        );
        // The old envelope still opens under the old version (until that version is destroyed).
        expect((await openRecord(env, A, lookup(keyA))).toString()).to.equal('PHI-MARKER');
      }
    });

    it('refuses to re-wrap with the wrong old key, version or record', () => {
      const head = envelopeHead(sealRecordBinary(keyA, A, Buffer.from('x')), A)!.head;
      const reason = (fn: () => unknown) => {
        try {
          fn();
        } catch (err) {
          return asInstance(err, RecordOpenError).reason;
        }
        throw new Error('expected a throw');
      };
      expect(reason(() => rewrapHead(head, A, keyB, keyV2))).to.equal('authentication_failed');
      expect(reason(() => rewrapHead(head, A, { version: 5, key: keyA.key }, keyV2))).to.equal(
        'key_unavailable',
      );
      expect(reason(() => rewrapHead(head, { ...A, recordId: 'inv-2' }, keyA, keyV2))).to.equal(
        'authentication_failed',
      );
      expect(reason(() => rewrapHead(Buffer.from('ccds\x03'), A, keyA, keyV2))).to.equal(
        'malformed',
      );
    });

    it('a head moved to another record does not open it (the wrap is bound to the address)', async () => {
      const B: RecordAddress = { ...A, recordId: 'inv-2' };
      const a = sealRecordBinary(keyA, A, Buffer.from('a'));
      const b = sealRecordBinary(keyA, B, Buffer.from('b'));
      const swapped = withHead(b, envelopeHead(a, A)!.head, B);
      expect((await openError(swapped, B, keyA)).reason).to.equal('authentication_failed');
    });

    it('withHead refuses a head of the other form, a legacy envelope, or a head with more after it', () => {
      const bin = sealRecordBinary(keyA, A, Buffer.from('x'));
      const text = sealRecord(keyA, A, Buffer.from('x'));
      const malformedOf = (fn: () => unknown) => {
        expect(fn).to.throw(RecordOpenError).with.property('reason', 'malformed');
      };
      malformedOf(() => withHead(bin, envelopeHead(text, A)!.head, A));
      malformedOf(() => withHead(text, envelopeHead(bin, A)!.head, A));
      malformedOf(() =>
        withHead(
          sealLegacyRecord('binary', keyA, A, Buffer.from('x')),
          envelopeHead(bin, A)!.head,
          A,
        ),
      );
      malformedOf(() => withHead(text, `${envelopeHead(text, A)!.head as string}.AAAA`, A));
    });
  });

  describe('older forms (sealed directly under the DEK, as stores wrote before record keys)', () => {
    for (const form of ['text', 'binary'] as const) {
      it(`${form}: round-trips, names its version, and fails on any flipped byte`, async () => {
        const env = sealLegacyRecord(form, { version: 9, key: keyA.key }, A, Buffer.from('PHI'));
        if (typeof env === 'string') {
          expect(env).to.match(/^ccds1\.9\./);
        } else {
          expect(Buffer.from(env).subarray(0, 5).toString('latin1')).to.equal('ccds\x02');
          expect(env).to.have.length(5 + 4 + 12 + 3 + 16);
        }
        const k9 = { version: 9, key: keyA.key };
        expect((await openRecord(env, A, lookup(k9))).toString()).to.equal('PHI');
        for (const segment of [2, 3, 4]) {
          const err = await openError(flipCiphertextByte(env, segment, 1), A, k9);
          expect(err.reason).to.equal('authentication_failed');
        }
        expect((await openError(env, { ...A, recordId: 'inv-9' }, k9)).reason).to.equal(
          'authentication_failed',
        );
      });
    }
  });
});
