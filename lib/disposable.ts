// Symbol.asyncDispose (for `await using`). Node 18.18+ defines it as Symbol.for('nodejs.asyncDispose') in the main
// realm; other realms (vm contexts, test runners) and older Nodes may lack it, so the registry symbol is used there:
// the same symbol wherever Node defines it.
export const asyncDispose: typeof Symbol.asyncDispose =
  (Symbol.asyncDispose ?? Symbol.for('nodejs.asyncDispose')) as typeof Symbol.asyncDispose;
