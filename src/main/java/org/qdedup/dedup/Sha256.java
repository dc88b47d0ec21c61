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

    /** {@code unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md)}, or null. */
    private static final MethodHandle NATIVE = link();

    private static final ThreadLocal<MessageDigest> JDK = ThreadLocal.withInitial(() -> {
        try {
            return MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    });

    private Sha256() {
    }

    private static MethodHandle link() {
        if (!"native".equals(System.getProperty("qdedup.sha256", "native"))) {
            return null;
        }
        try {
            SymbolLookup crypto = SymbolLookup.libraryLookup("libcrypto.so.3", Arena.global());
            // critical: a short call on heap arrays, without the thread-state change of an ordinary downcall.
            return Linker.nativeLinker().downcallHandle(crypto.find("SHA256").orElseThrow(),
                    FunctionDescriptor.of(ValueLayout.ADDRESS, ValueLayout.ADDRESS, ValueLayout.JAVA_LONG, ValueLayout.ADDRESS),
                    Linker.Option.critical(true));
        } catch (Throwable t) {
            return null;
        }
    }

    /** Whether hashes come from libcrypto. */
    public static boolean isNative() {
        return NATIVE != null;
    }

    /** The 32-byte SHA-256 of {@code data[off, off + len)}. */
    public static byte[] of(byte[] data, int off, int len) {
        java.util.Objects.checkFromIndexSize(off, len, data.length);
        byte[] md = new byte[LENGTH];
        if (NATIVE != null) {
            try {
                MemorySegment unused = (MemorySegment) NATIVE.invokeExact(
                        MemorySegment.ofArray(data).asSlice(off, len), (long) len, MemorySegment.ofArray(md));
                return md;
            } catch (Throwable t) {
                throw new IllegalStateException("libcrypto SHA256 failed", t);
            }
        }
        MessageDigest d = JDK.get(); // one per thread: the provider lookup costs more than a 4 KiB hash
        d.update(data, off, len);
        return d.digest();
    }
}
