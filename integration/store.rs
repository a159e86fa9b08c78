//! The store layer against a real S3 server, driven through the library where the binary gives
//! no handle on it: a writer dropped after a local failure must not leave its multipart upload
//! (and the parts' storage) behind.

use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use walvault::testing;

use crate::harness::s3::{self, ACCESS_KEY, REGION, SECRET_KEY};
use crate::harness::TestEnv;

/// The keys of the multipart uploads open in `bucket`.
async fn open_uploads(client: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let listed = client
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .expect("ListMultipartUploads");
    listed
        .uploads()
        .iter()
        .filter_map(|u| u.key().map(str::to_owned))
        .collect()
}

#[test]
fn a_dropped_s3_writer_aborts_its_multipart_upload() {
    let env = TestEnv::new("store-multipart-drop");
    let server = s3::server();
    let bucket = server.new_bucket();
    let config = env.path().join("walvault.toml");
    std::fs::write(
        &config,
        format!(
            "repo = \"s3://{bucket}/r\"\n[s3]\nendpoint = \"{}\"\nregion = \"{REGION}\"\n\
             force_path_style = true\naccess_key_id = \"{ACCESS_KEY}\"\n\
             secret_access_key = \"{SECRET_KEY}\"\npart_size = {}\n",
            server.endpoint(),
            5 << 20
        ),
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .endpoint_url(server.endpoint())
                .region(Region::new(REGION))
                .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "t"))
                .force_path_style(true)
                .build(),
        );
        // More than a part: the upload is created and its first part stored. Then the caller
        // fails locally (a file it read changed, say) and drops the writer.
        testing::write_and_drop(&config, "base/pack-1", (5 << 20) + 1, async {
            assert_eq!(open_uploads(&client, &bucket).await, ["r/base/pack-1"]);
        })
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !open_uploads(&client, &bucket).await.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the multipart upload of a dropped writer is still open after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!testing::exists(&config, "base/pack-1").await.unwrap());
    });
}
