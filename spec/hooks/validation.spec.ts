import { expect } from 'chai';
import fc from 'fast-check';
import { assertSafeJsonKeys, HookRequestError } from '../../hooks/index.ts';

const FORBIDDEN = ['__proto__', 'constructor', 'prototype'];

/** The plain walk the check must agree with: the first forbidden key or too-deep level, or none. */
function reference(value: unknown, depth = 0): boolean {
  if (typeof value !== 'object' || value === null) {
    return true;
  }
  if (depth > 64) {
    return false;
  }
  if (!Array.isArray(value) && Object.keys(value).some((key) => FORBIDDEN.includes(key))) {
    return false;
  }
  const children: unknown[] = Array.isArray(value) ? value : Object.values(value);
  return children.every((child) => reference(child, depth + 1));
}

/** JSON text with keys drawn from a few names, forbidden ones among them, parsed as a body is. */
const parsedJson = fc
  .letrec((tie) => ({
    value: fc.oneof(
      { depthSize: 'small', withCrossShrink: true },
      fc.constant(null),
      fc.integer(),
      fc.string({ maxLength: 3 }),
      fc.array(tie('value'), { maxLength: 4 }),
      fc.dictionary(fc.constantFrom('a', 'b', 'resourceType', ...FORBIDDEN), tie('value'), {
        maxKeys: 4,
      }),
    ),
  }))
  .value.map((v) => JSON.parse(JSON.stringify(v)) as unknown);

/** `depth` levels of arrays and objects around a leaf. */
function nested(depth: number): unknown {
  let value: unknown = 1;
  for (let i = 0; i < depth; i++) {
    value = i % 2 === 0 ? [value] : { a: value };
  }
  return value;
}

describe('hooks/ assertSafeJsonKeys', () => {
  it('refuses exactly the values a plain walk refuses (property)', () => {
    fc.assert(
      fc.property(parsedJson, (value) => {
        let refused = false;
        try {
          assertSafeJsonKeys(value);
        } catch (err) {
          expect(err).to.be.instanceOf(HookRequestError);
          refused = true;
        }
        expect(refused).to.equal(!reference(value));
      }),
    );
  });

  it('accepts 64 levels of nesting and refuses 66, naming the path', () => {
    expect(() => {
      assertSafeJsonKeys(nested(65));
    }).to.not.throw();
    expect(() => {
      assertSafeJsonKeys(nested(66), 'context');
    })
      .to.throw(HookRequestError)
      .that.matches(/nesting deeper than 64 levels/);
  });

  it('names the forbidden key it finds, wherever it is', () => {
    const body = JSON.parse('{"a":[{"b":1},{"c":{"constructor":{}}}]}') as unknown;
    expect(() => {
      assertSafeJsonKeys(body, 'prefetch');
    })
      .to.throw(HookRequestError)
      .with.property('field', 'prefetch.a[1].c.constructor');
  });
});
