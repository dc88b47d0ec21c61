package org.qdedup.dedup;

import java.lang.foreign.Arena;
import java.lang.foreign.FunctionDescriptor;
import java.lang.foreign.Linker;
import java.lang.foreign.MemorySegment;
import java.lang.foreign.SymbolLookup;
import java.lang.foreign.ValueLayout;
import java.lang.invoke.MethodHandle;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;

/**
 * SHA-256 of one cluster. Uses the system's libcrypto (OpenSSL 3, SHA-NI where the CPU has it) when it can be
 * loaded, else the JDK's provider. The JDK's is as fast only once C2 has compiled it with its intrinsic, and that
 * compilation costs one-shot commands more CPU than their hashing; libcrypto is fast from the first cluster, so
 * those commands can run on C1 alone. {@code -Dqdedup.sha256=jdk} forces the JDK's.
 */
public final class Sha256 {
    public static final int LENGTH = 32;

    /**
     * libcrypto's {@code SHA256_Init}, {@code SHA256_Update} and {@code SHA256_Final} (null when not loaded): the
     * one-shot {@code SHA256()} of OpenSSL 3 fetches the algorithm from its provider store (under a lock) on every
     * call, which costs 12 % of a 4 KiB hash here; these run the same code on a context of our own.
     */
    private static final MethodHandle INIT, UPDATE, FINAL;
    /** {@code sizeof(SHA256_CTX)} is 112 bytes in OpenSSL 3; room to spare. */
    private static final long CTX_BYTES = 256;
    private static final ThreadLocal<MemorySegment> CTX = ThreadLocal.withInitial(() -> Arena.ofAuto().allocate(CTX_BYTES, 16));

    static {
        MethodHandle[] h = link();
        INIT = h == null ? null : h[0];
        UPDATE = h == null ? null : h[1];
        FINAL = h == null ? null : h[2];
    }

    private static final ThreadLocal<MessageDigest> JDK = ThreadLocal.withInitial(() -> {
        try {
            return MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    });

    private Sha256() {
    }

    private static MethodHandle[] link() {
        if (!"native".equals(System.getProperty("qdedup.sha256", "native"))) {
            return null;
        }
        try {
            SymbolLookup crypto = SymbolLookup.libraryLookup("libcrypto.so.3", Arena.global());
            Linker l = Linker.nativeLinker();
            // critical: short calls on heap arrays, without the thread-state change of an ordinary downcall.
            Linker.Option critical = Linker.Option.critical(true);
            return new MethodHandle[]{
                l.downcallHandle(crypto.find("SHA256_Init").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_INT, ValueLayout.ADDRESS), critical),
                l.downcallHandle(crypto.find("SHA256_Update").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_INT, ValueLayout.ADDRESS, ValueLayout.ADDRESS, ValueLayout.JAVA_LONG), critical),
                l.downcallHandle(crypto.find("SHA256_Final").orElseThrow(),
                        FunctionDescriptor.of(ValueLayout.JAVA_INT, ValueLayout.ADDRESS, ValueLayout.ADDRESS), critical)};
        } catch (Throwable t) {
            return null;
        }
    }

    /** Whether hashes come from libcrypto. */
    public static boolean isNative() {
        return INIT != null;
    }

    /** The 32-byte SHA-256 of {@code data[off, off + len)}. */
    public static byte[] of(byte[] data, int off, int len) {
        java.util.Objects.checkFromIndexSize(off, len, data.length);
        byte[] md = new byte[LENGTH];
        if (INIT != null) {
            MemorySegment ctx = CTX.get();
            int ok;
            try {
                ok = (int) INIT.invokeExact(ctx);
                ok &= (int) UPDATE.invokeExact(ctx, MemorySegment.ofArray(data).asSlice(off, len), (long) len);
                ok &= (int) FINAL.invokeExact(MemorySegment.ofArray(md), ctx);
            } catch (Throwable t) {
                throw new IllegalStateException("libcrypto SHA-256 failed", t);
            }
            if (ok != 1) {
                throw new IllegalStateException("libcrypto SHA-256 failed");
            }
            return md;
        }
        MessageDigest d = JDK.get(); // one per thread: the provider lookup costs more than a 4 KiB hash
        d.update(data, off, len);
        return d.digest();
    }
}
