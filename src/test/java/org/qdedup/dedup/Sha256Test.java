package org.qdedup.dedup;

import static org.assertj.core.api.Assertions.assertThat;
import static org.assertj.core.api.Assertions.assertThatThrownBy;

import java.security.MessageDigest;
import java.util.HexFormat;
import java.util.Random;
import org.junit.jupiter.api.Test;

class Sha256Test {
    @Test
    void libcryptoIsUsedOnTheseMachines() {
        // Debian ships libssl3 in its base system; losing it would silently make one-shot dedup commands slow.
        assertThat(Sha256.isNative()).isTrue();
    }

    @Test
    void knownAnswers() {
        assertThat(HexFormat.of().formatHex(Sha256.of(new byte[0], 0, 0)))
                .isEqualTo("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        byte[] abc = "xxabcyy".getBytes(java.nio.charset.StandardCharsets.US_ASCII);
        assertThat(HexFormat.of().formatHex(Sha256.of(abc, 2, 3)))
                .isEqualTo("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    @Test
    void sameAsTheJdkAtEveryOffsetAndLength() throws Exception {
        Random r = new Random(7);
        byte[] data = new byte[3 << 20];
        r.nextBytes(data);
        MessageDigest jdk = MessageDigest.getInstance("SHA-256");
        int[] lengths = {1, 55, 56, 63, 64, 65, 511, 512, 4096, 65536, 2 << 20};
        for (int len : lengths) {
            for (int k = 0; k < 5; k++) {
                int off = r.nextInt(data.length - len);
                jdk.update(data, off, len);
                assertThat(Sha256.of(data, off, len)).as("len %d off %d", len, off).isEqualTo(jdk.digest());
            }
        }
    }

    @Test
    void rangeOutsideTheArrayIsRefused() {
        assertThatThrownBy(() -> Sha256.of(new byte[10], 8, 4)).isInstanceOf(IndexOutOfBoundsException.class);
    }
}
